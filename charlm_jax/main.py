"""Trains a character-level language model.

    python -m charlm_jax.main --config=configs/transformer.py[:PRESET] --workdir=DIR \
        [--config.model.num_layers=6 ...]

The same command trains on every visible device. For several hosts, run it in each process
with --coordinator_address, --num_processes and --process_id (or the JAX_* variables).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from charlm_jax import cli
from charlm_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for the config, tokenizer, checkpoints, summary.")
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with a preset: configs/transformer.py:small.",
    lock_config=True,
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for a multi-process run (default: $JAX_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer("num_processes", None, "Processes in the run (default: $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (default: $JAX_PROCESS_ID).")
flags.DEFINE_integer("coordinator_timeout", 300, "Seconds to wait for all processes to join.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_compilation_cache_flag()


def _training_modules():
    """`parallel` and `train`, imported once the flags parse (`--help` and a bad flag need no
    JAX) and without IPython: flax.nnx imports IPython, with its whole terminal stack, only
    to ask whether it runs inside IPython, which this command never does."""
    sys.modules.setdefault("IPython", None)  # an import of it raises ImportError
    from charlm_jax.training import parallel, train

    return parallel, train


def main(argv: list[str]) -> None:
    cli.start(argv)
    parallel, train = _training_modules()
    cli.use_compilation_cache(FLAGS.compilation_cache)
    with cli.exit_on_error(UserError):
        train.validate(FLAGS.config)  # before JAX starts or waits for other processes
        parallel.one_cpu_device_per_core(FLAGS.config.train.batch_size)
        parallel.initialize_distributed(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.coordinator_timeout,
        )
        parallel.warn_if_gpu_wheel_unused()
        with cli.StopSignals() as signals:
            summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, signals.requested)
    if summary["stop_reason"].startswith("interrupted"):
        sys.exit(
            f"{summary['stop_reason']}: checkpoint saved at step {summary['steps']}; "
            "run the same command to resume"
        )


if __name__ == "__main__":
    # A config file that failed to load raises only when used: check it while parsing.
    app.run(main, flags_parser=cli.flags_parser(lambda: FLAGS.config.to_dict()))
