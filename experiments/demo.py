"""Your first model in about a minute on a CPU: trains a small Transformer on tiny Shakespeare,
showing the loss going down, then samples text at three temperatures.

    python experiments/demo.py [--workdir=runs/demo] [--config.train.num_steps=1000 ...]

The config is configs/transformer.py:demo; any field can be overridden. Running it again
in the same workdir only samples (the run is finished), or trains further with more steps.
"""

import math
import sys
from pathlib import Path

import provenance
from absl import app, flags, logging
from ml_collections import config_flags

from charlm_jax import cli
from charlm_jax.decoding.sampling import Sampler
from charlm_jax.errors import UserError, one_line
from charlm_jax.training import train

config_flags.DEFINE_config_file("config", "configs/transformer.py:demo", "Config file and preset.")
flags.DEFINE_string("workdir", "runs/demo", "Directory of the run.")
flags.DEFINE_string("prompt", "ROMEO:", "Prompt of the samples.")
flags.DEFINE_list("temperatures", ["0.5", "0.8", "1.0"], "Sampling temperatures.")
flags.DEFINE_integer("max_new_tokens", 200, "Characters per sample.")
FLAGS = flags.FLAGS


def loss_table(history: list[dict]) -> str:
    """The evaluations as a small text table."""
    lines = ["  step   train loss   val loss   bits/char"]
    for record in history:
        lines.append(
            f"{record['step']:6d}   {record['train_loss']:10.4f}   {record['val_loss']:8.4f}"
            f"   {record['val_loss'] / math.log(2):9.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_library_logs()
    logging.set_verbosity(logging.INFO)
    config = FLAGS.config
    print(
        f"Training a {config.model.num_layers}-layer Transformer (width "
        f"{config.model.embedding_dim}) for {config.train.num_steps} steps on tiny "
        f"Shakespeare, evaluating every {config.train.eval_every} steps...\n",
        flush=True,
    )
    started = provenance.begin()
    try:
        temperatures = [float(t) for t in FLAGS.temperatures]
        summary = train.train_and_evaluate(config, FLAGS.workdir)
        sampler = Sampler.from_workdir(FLAGS.workdir)
        texts = {
            t: sampler.generate([FLAGS.prompt], FLAGS.max_new_tokens, temperature=t)[0]
            for t in temperatures
        }
    except (UserError, ValueError) as e:
        sys.exit(f"error: {one_line(e)}")
    # What made the run's summary.json, for experiments/report.py.
    provenance.write_json(Path(FLAGS.workdir) / provenance.FILE, {"summary": "summary.json"},
                          started)  # fmt: skip
    speed = summary["train_tokens_per_sec"]  # None when the run had finished before
    print(
        f"\n{summary['num_params']:,} parameters, {summary['steps']} steps, "
        f"{summary['wall_time_s']:.0f} s" + (f", {speed:,.0f} tokens/s\n" if speed else "\n")
    )
    print(loss_table(summary["history"]))
    print(f"\nLoss curve: {Path(FLAGS.workdir) / train.LOSS_CURVE_FILE}")
    for t, text in texts.items():
        print(f"\n--- temperature {t:g} ---\n{FLAGS.prompt}{text}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(lambda: FLAGS.config.to_dict()))
