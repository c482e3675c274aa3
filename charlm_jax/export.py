"""Exports a trained Transformer as a Hugging Face model folder (safetensors, config and
tokenizer), which `transformers` and vLLM load (docs/serving.md):

    python -m charlm_jax.export --workdir=DIR --out=DIR2 [--checkpoint=best|latest|STEP]
"""

from __future__ import annotations

from absl import app, flags

from charlm_jax import cli
from charlm_jax.workdir import hf_export

flags.DEFINE_string("workdir", None, "A trained run's directory.", required=True)
flags.DEFINE_string("out", None, "New (or empty) directory for the model folder.", required=True)
flags.DEFINE_string("checkpoint", "best", 'Checkpoint: "best", "latest" or a step number.')


def main(argv: list[str]) -> None:
    cli.start(argv)
    FLAGS = flags.FLAGS
    with cli.exit_on_error(), cli.stderr_held():
        out = hf_export.export(FLAGS.workdir, FLAGS.out, cli.checkpoint_arg(FLAGS.checkpoint))
    print(f"Hugging Face model folder written to {out}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
