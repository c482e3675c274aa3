"""Training throughput with batches drawn on the device inside the jitted step against
batches drawn on the host and prefetched to the device by a thread (the path memory-mapped
corpora take); same preset, same data, alternating runs in one process.

    python experiments/benchmark_batching.py --config=configs/transformer.py:small --steps=300
    python experiments/benchmark_batching.py --path=/tmp/charlm_benchmark/corpus.txt  # memmap
"""

import statistics
import tempfile
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from charlm_jax.training import train

config_flags.DEFINE_config_file("config", "configs/transformer.py:small", "Config file[:preset].")
flags.DEFINE_integer("steps", 300, "Training steps per run.")
flags.DEFINE_integer("repeats", 2, "Runs per batching mode (alternating).")
flags.DEFINE_string("path", "", "Corpus (default: the embedded tiny Shakespeare).")
flags.DEFINE_float("memmap_above_mb", 100.0, "data.memmap_above_mb")
FLAGS = flags.FLAGS


def run(batches: str, workdir: Path) -> dict:
    config = FLAGS.config.copy_and_resolve_references()  # training may change its config
    config.data.path, config.data.batches = FLAGS.path, batches
    config.data.memmap_above_mb = FLAGS.memmap_above_mb
    config.train.num_steps = config.train.eval_every = FLAGS.steps
    config.train.eval_batches = 2
    return train.train_and_evaluate(config, workdir)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    results = {"device": [], "host": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(FLAGS.repeats):
            for mode in results:
                summary = run(mode, Path(tmp) / f"{mode}{i}")
                results[mode].append(summary)
                print(
                    f"{mode:6s} run {i}: {summary['train_tokens_per_sec']:,.0f} tokens/s, "
                    f"{summary['step_time_ms']:.2f} ms/step",
                    flush=True,
                )
    for mode, summaries in results.items():
        rates = [s["train_tokens_per_sec"] for s in summaries]
        steps = [s["step_time_ms"] for s in summaries]
        runs = ", ".join(f"{r:,.0f}" for r in rates)
        print(
            f"{mode:6s} median {statistics.median(rates):,.0f} tokens/s, "
            f"{statistics.median(steps):.2f} ms/step (runs: {runs})"
        )


if __name__ == "__main__":
    app.run(main)
