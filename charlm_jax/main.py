"""Trains a character-level language model.

    python -m charlm_jax.main --config=configs/transformer.py[:PRESET] --workdir=DIR \
        [--config.model.num_layers=6 ...]
"""

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from charlm_jax import train
from charlm_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for the config, tokenizer, checkpoints, summary.")
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with a preset: configs/transformer.py:small.",
    lock_config=True,
)
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries(record: pylogging.LogRecord) -> bool:
    """Keeps this package's INFO lines and everyone's warnings (orbax logs every file at INFO)."""
    return record.levelno >= pylogging.WARNING or f"{__package__}/" in record.pathname


def _one_line(error: BaseException) -> str:
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError())
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = lines[-1:]  # config_flags embeds the config file's traceback: keep its last line
    return " ".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad flag, config file, preset or config field exits with one line."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.to_dict()  # a config file that failed to load only raises when used
    except Exception as e:  # absl and ml_collections raise many types
        prefix = "unknown config field " if isinstance(e, (AttributeError, KeyError)) else ""
        sys.exit(f"error: {prefix}{_one_line(e)}")
    return remaining


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_quiet_libraries)
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
