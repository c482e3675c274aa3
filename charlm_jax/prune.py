"""Structured pruning: removes the least important MLP neurons, giving a smaller dense model.

    python -m charlm_jax.prune --workdir=DIR --out=DIR2 --mlp_keep=0.5 [--finetune_steps=N]

DIR2 is a workdir like any other (config.json with the smaller `model.hidden_dim`, the
tokenizer, an orbax checkpoint with a fresh optimizer state), so it trains, samples and serves
as usual; with --finetune_steps it is trained that many steps by the normal training loop.
The criterion is in `charlm_jax.model.pruning`, the workdir tool in
`charlm_jax.training.prune_workdir` (docs/quantization.md).
"""

from __future__ import annotations

from absl import app, flags

from charlm_jax import cli
from charlm_jax.training.prune_workdir import prune_workdir


def main(argv: list[str]) -> None:
    cli.start(argv)
    FLAGS = flags.FLAGS
    with cli.exit_on_error():  # stderr not held: fine-tuning logs its progress there
        result = prune_workdir(
            FLAGS.workdir, FLAGS.out, FLAGS.mlp_keep, FLAGS.finetune_steps,
            FLAGS.finetune_learning_rate, cli.checkpoint_arg(FLAGS.checkpoint),
        )  # fmt: skip
    line = f"pruned to hidden_dim {result['hidden_dim']}, {result['num_params']:,} parameters"
    print(f"{line}; validation {result['val_bpc']:.4f} bits per character before fine-tuning")
    if "finetune" in result:
        print(f"fine-tuned: best validation loss {result['finetune']['best_val_loss']:.4f}")


if __name__ == "__main__":  # flags defined here: importing the module defines none
    flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
    flags.DEFINE_string(
        "out", None, required=True, help="Directory for the pruned model (a new workdir)."
    )
    flags.DEFINE_string("checkpoint", "best", 'Checkpoint: "best", "latest" or a step number.')
    flags.DEFINE_float("mlp_keep", 0.5, "Fraction of each MLP's hidden neurons kept, in (0, 1].")
    flags.DEFINE_integer("finetune_steps", 0, "Training steps after pruning (0: none).")
    flags.DEFINE_float("finetune_learning_rate", None, "Peak learning rate (default: the run's).")
    app.run(main, flags_parser=cli.flags_parser())
