"""Where a measured number comes from: every measuring script writes its JSON through
`write_json`, which adds what `experiments/report.py --check` requires before a table may
show the numbers.

    started = provenance.begin()           # first thing: the load average before the run
    ...                                    # measure
    provenance.write_json(path, {"runs": [...], ...}, started)

The record (under the key "provenance"): the command line, the git commit and whether the
checkout had uncommitted changes, the UTC date and time, the machine (CPU model and cores,
memory, GPU names), the versions of Python, jax and jaxlib (and of torch for a PyTorch peer,
given by the caller: the peer runs in another Python), and the load average (1, 5, 15 min)
before and after. It imports neither JAX nor torch.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The record of a command whose results are a folder of files (a sweep's, a demo run's).
FILE = "provenance.json"
# What report.py requires of every source of a table.
FIELDS = ("command", "commit", "dirty", "date", "machine", "versions", "load_before",
          "load_after")  # fmt: skip


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    """NVIDIA GPUs as nvidia-smi names them, with their memory ([] without one)."""
    if not shutil.which("nvidia-smi"):
        return []
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    done = subprocess.run(query, capture_output=True, text=True)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def machine() -> dict:
    """The CPU model and core count, memory and GPUs of this machine."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
        "system": f"{platform.system()} {platform.release()}",
    }


def versions(**extra: str) -> dict:
    """Python's, jax's and jaxlib's versions (None where not installed), and `extra`."""
    found = {"python": platform.python_version()}
    for package in ("jax", "jaxlib"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found | extra


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed from the repository root: `python experiments/x.py --flag=...`."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *argv[1:]])


def begin(argv: list[str] | None = None) -> dict:
    """What is known when a measurement starts: its command, the code it runs, the load."""
    return {
        "command": command_line(argv),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_before": list(os.getloadavg()),
    }


def finish(started: dict, **extra_versions: str) -> dict:
    """The whole record: `started` (from `begin`) with the machine, versions and load now."""
    return {
        **started,
        "machine": machine(),
        "versions": versions(**extra_versions),
        "load_after": list(os.getloadavg()),
    }


def write_json(path: str | Path, result: dict, started: dict, **extra_versions: str) -> dict:
    """Writes `result` (the per-run numbers) with its provenance to `path`; returns both."""
    record = {"provenance": finish(started, **extra_versions), **result}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def missing(record: dict) -> list[str]:
    """The provenance fields that `record` lacks or leaves empty (commit, command, date)."""
    prov = record.get("provenance")
    if not isinstance(prov, dict):
        return list(FIELDS)
    absent = [key for key in FIELDS if key not in prov]
    return absent + [key for key in ("command", "commit", "date") if key in prov and not prov[key]]
