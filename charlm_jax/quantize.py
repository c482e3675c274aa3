"""Exports an int8 copy of a trained workdir (docs/quantization.md).

    python -m charlm_jax.quantize --workdir=DIR --out=DIR2 [--checkpoint=best|latest|STEP]

DIR2 loads with `--quantize=int8` only. The int8 layers are `charlm_jax.model.int8`; the
export is `charlm_jax.workdir.int8_export`.
"""

from __future__ import annotations

from absl import app, flags

from charlm_jax import cli
from charlm_jax.workdir.int8_export import export_int8


def main(argv: list[str]) -> None:
    cli.start(argv)
    FLAGS = flags.FLAGS
    with cli.exit_on_error(), cli.stderr_held():
        path = export_int8(FLAGS.workdir, FLAGS.out, cli.checkpoint_arg(FLAGS.checkpoint))
    print(f"int8 checkpoint written to {path}")


if __name__ == "__main__":  # flags defined here: importing the module defines none
    flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
    flags.DEFINE_string(
        "out", None, required=True, help="Directory for the quantized copy (a new workdir)."
    )
    flags.DEFINE_string("checkpoint", "best", 'Checkpoint: "best", "latest" or a step number.')
    app.run(main, flags_parser=cli.flags_parser())
