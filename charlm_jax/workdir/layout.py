"""A training run's workdir: made ready to write, checked before a resume, and given the
run's summary (the files themselves are listed in checkpoints.py)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections

from charlm_jax.errors import UserError
from charlm_jax.workdir import checkpoints, files

# Fields that must match to resume from a workdir's checkpoints (the state's shapes).
RESUME_FIELDS = ("model.", "data.context_length")
RESUME_FREE = ("model.dtype", "model.remat")  # how the model computes, not what it holds
LOCK_FILE = ".lock"


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
    files.write_text(workdir / checkpoints.SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """Holds the workdir for one run: a second run on it meanwhile (another process, or
    this one) stops with UserError naming the holder's pid. The lock is the OS's (flock on
    DIR/.lock, one per process of a multi-process run): it ends with its process, even a
    killed one, so it is never stale."""
    path = workdir / f"{LOCK_FILE}{jax.process_index() or ''}"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(
                f"workdir {workdir} is in use by another run (pid {holder}); wait for it to "
                "end, or train in another workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield  # leaving `with open` closes the file, which releases the lock
