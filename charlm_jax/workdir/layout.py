"""A training run's workdir: made ready to write, checked before a resume, and given the
run's summary (the files themselves are listed in checkpoints.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections

from charlm_jax.errors import UserError
from charlm_jax.workdir import checkpoints

# Fields that must match to resume from a workdir's checkpoints (the state's shapes).
RESUME_FIELDS = ("model.", "data.context_length")
RESUME_FREE = ("model.dtype", "model.remat")  # how the model computes, not what it holds


def prepare(workdir: str | Path) -> Path:
    """The workdir as a Path, created if needed; UserError if it cannot be written."""
    if not str(workdir):
        raise UserError("the workdir path is empty")
    workdir = Path(workdir).expanduser()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
    return workdir


def _flat(config: ml_collections.ConfigDict) -> dict:
    """{"model.num_layers": 4, ...} for every leaf field."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            flat[key] = value
    return flat


def check_resumable(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """UserError unless the checkpoints in `workdir` hold the model `config` describes."""
    now, there = _flat(config), _flat(checkpoints.read_run_config(workdir))
    differing = [
        f"{name}: {there.get(name)!r} there, {now.get(name)!r} now"
        for name in sorted(set(now) | set(there))
        if name.startswith(RESUME_FIELDS)
        and name not in RESUME_FREE
        and now.get(name) != there.get(name)
    ]
    if differing:
        raise UserError(
            f"workdir {workdir} holds checkpoints of a different model ({'; '.join(differing)}); "
            "train in a new workdir, or with the same config to resume"
        )


def write_summary(workdir: Path, summary: dict) -> None:
    """DIR/summary.json, replaced whole (a reader never sees half of it)."""
    path = workdir / checkpoints.SUMMARY_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
