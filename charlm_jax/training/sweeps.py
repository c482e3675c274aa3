"""Config sweeps: the grid of runs, running them (each in its own process), and their table
and plots.

A sweep is a config file argument (`configs/transformer.py:small`), fixed overrides
(`train.num_steps=500`) and swept ones (`model.num_layers=2,4,6`); the key `preset` sweeps the
config file's preset. Each run trains in DIR/NAME, NAME made of its swept values. A run whose
DIR/NAME/summary.json says it finished is skipped; others start, or resume from their
checkpoints. DIR/results.csv and DIR/results.md hold one row per run, best first.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

import charlm_jax
from charlm_jax.errors import UserError, flag_error_message
from charlm_jax.training import curves, train
from charlm_jax.workdir import checkpoints

PRESET_KEY = "preset"  # a swept key that picks the config file's preset
LOG_FILE = "train.log"  # each run's console output, in its workdir
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
CURVES_PNG = "val_curves.png"
LOSS_VS_PARAMS_PNG = "loss_vs_params.png"
LOSS_VS_TIME_PNG = "loss_vs_time.png"
# Summary fields reported per run, in table order.
SUMMARY_COLUMNS = (
    "num_params",
    "best_val_loss",
    "best_val_bpc",
    "steps",
    "train_tokens_per_sec",
    "wall_time_s",
)

NUMBER_FORMATS = {
    "num_params": "{:,}",
    "best_val_loss": "{:.4f}",
    "best_val_bpc": "{:.3f}",
    "train_tokens_per_sec": "{:,.0f}",
    "wall_time_s": "{:.0f}",
}


@dataclass(frozen=True)
class Run:
    """One training run: a config file argument and `--config.KEY=VALUE` overrides."""

    name: str
    config: str  # "configs/transformer.py:small"
    overrides: dict[str, str] = field(default_factory=dict)
    swept: dict[str, str] = field(default_factory=dict)  # the values that name the run

    def flags(self) -> list[str]:
        overrides = [f"--config.{key}={value}" for key, value in self.overrides.items()]
        return [f"--config={self.config}", *overrides]


def parse_assignment(text: str) -> tuple[str, list[str]]:
    """Splits "model.num_layers=2,4,6" into ("model.num_layers", ["2", "4", "6"])."""
    key, sep, values = text.partition("=")
    key = key.strip()
    parts = [v.strip() for v in values.split(",")]
    if not sep or not key:
        raise UserError(f"malformed override {text!r}: expected KEY=VALUE[,VALUE...]")
    if key != PRESET_KEY and not re.fullmatch(r"\w+(\.\w+)+", key):
        raise UserError(f"malformed override {text!r}: KEY is a dotted field like model.num_layers")
    if not all(parts):
        raise UserError(f"malformed override {text!r}: empty value")
    if len(set(parts)) < len(parts):
        raise UserError(f"malformed override {text!r}: repeated value")
    return key, parts


def run_name(swept: dict[str, str]) -> str:
    """A directory name from the swept values: "num_layers=2__position=rope". Keys are
    shortened to their last part unless two would clash."""
    short = [key.rsplit(".", 1)[-1] for key in swept]
    keys = short if len(set(short)) == len(short) else list(swept)
    name = "__".join(f"{k}={v}" for k, v in zip(keys, swept.values(), strict=True)) or "run"
    return re.sub(r"[^\w.=+-]", "_", name)


def _with_preset(config: str, preset: str) -> str:
    path = config.rsplit(":", 1)[0] if re.search(r"\.py:\w+$", config) else config
    return f"{path}:{preset}"


def expand_grid(config: str, sweeps: Sequence[str], sets: Sequence[str] = ()) -> list[Run]:
    """The runs of the Cartesian product of `sweeps` ("KEY=V1,V2"), each with the fixed
    overrides `sets` ("KEY=VALUE"), in sweep order."""
    fixed, axes = {}, {}
    for text in sets:
        key, values = parse_assignment(text)
        if len(values) > 1:
            raise UserError(f"--set {text!r} has several values: sweep them with --sweep")
        fixed[key] = values[0]
    for text in sweeps:
        key, values = parse_assignment(text)
        if key in axes or key in fixed:
            raise UserError(f"{key} is given twice (in --sweep or --set)")
        axes[key] = values
    runs = []
    for combo in itertools.product(*axes.values()):
        swept = dict(zip(axes, combo, strict=True))
        overrides = {**fixed, **swept}
        preset = overrides.pop(PRESET_KEY, None)
        run_config = _with_preset(config, preset) if preset else config
        runs.append(Run(run_name(swept), run_config, overrides, swept))
    return runs


def load_config(run: Run) -> ml_collections.ConfigDict:
    """The run's config, parsed exactly as `python -m charlm_jax.main` parses its flags and
    validated as it validates them (`train.validate`); a bad config file, preset, key or
    value, or a config that cannot train, raises UserError in one line."""
    argv = ["sweep", *run.flags()]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    try:
        flag_values(argv)
        config = flag_values.config
    except Exception as e:  # absl and ml_collections raise many types
        raise UserError(f"run {run.name}: {flag_error_message(e)}") from None
    try:
        train.validate(config)
    except UserError as e:
        raise UserError(f"run {run.name}: {e}") from None
    return config


def is_finished(workdir: Path, config: ml_collections.ConfigDict) -> bool:
    """Whether DIR/summary.json records a run that stopped by itself at or beyond the
    config's step count (early stopping and epochs count as finished)."""
    path = workdir / checkpoints.SUMMARY_FILE
    if not path.exists():
        return False
    summary = json.loads(path.read_text())
    if summary["stop_reason"].startswith("interrupted"):
        return False
    tc = config.train
    return (
        summary["stop_reason"] != "num_steps"
        or tc.num_epochs > 0
        or (summary["steps"] >= tc.num_steps)
    )


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")


class _Launcher:
    """Starts runs as `python -m charlm_jax.main` processes, each in its own session, so
    that a Ctrl-C reaches only the sweep, which stops each run once (it checkpoints)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen] = set()
        self.stopping = False

    def train(self, run: Run, workdir: Path) -> tuple[str, str]:
        """Trains `run` in `workdir`: ("done" | "failed" | "interrupted", error line)."""
        workdir.mkdir(parents=True, exist_ok=True)
        # The runs import the package the sweep imported, installed or not.
        package_root = str(Path(charlm_jax.__file__).resolve().parents[1])
        path = [package_root, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        command = [sys.executable, "-m", "charlm_jax.main", f"--workdir={workdir}", *run.flags()]
        with self._lock:
            if self.stopping:
                return "interrupted", "not started"
            with (workdir / LOG_FILE).open("a") as log:  # kept across resumes
                process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            self._live.add(process)
        returncode = process.wait()
        with self._lock:
            self._live.discard(process)
        if returncode == 0:
            return "done", ""
        line = _last_line(workdir / LOG_FILE)
        if returncode < 0:
            line = f"killed by {signal.Signals(-returncode).name}"
        return ("interrupted" if line.startswith("interrupted") else "failed"), line

    def stop(self) -> None:
        """Asks every live run to checkpoint and stop; no new run starts."""
        with self._lock:
            self.stopping = True
            for process in self._live:
                process.send_signal(signal.SIGTERM)


def run_sweep(runs: Sequence[Run], workdir: str | Path, jobs: int = 1) -> list[dict]:
    """Validates every run's config (`load_config`), then trains the unfinished runs (`jobs`
    at a time) and writes the results table and plots. Returns the table's rows, best first.

    A failed run is recorded with its error and the others go on; a KeyboardInterrupt (Ctrl-C,
    or SIGTERM under `cli.StopSignals(cli.interrupt)`) stops the running ones (they
    checkpoint, and resume when the sweep runs again) and is raised again after the table is
    written.
    """
    workdir = Path(workdir)
    if len({run.name for run in runs}) < len(runs):
        raise UserError("two runs have the same name: give each swept key distinct values")
    configs = {run.name: load_config(run) for run in runs}  # every config before any run
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the sweep's workdir {workdir}: {e.strerror or e}") from None
    outcomes: dict[str, tuple[str, str]] = {}
    todo = []
    for run in runs:
        if is_finished(workdir / run.name, configs[run.name]):
            logging.info("%s: finished earlier, skipped", run.name)
            outcomes[run.name] = ("done", "")
        else:
            todo.append(run)

    launcher = _Launcher()

    def train(run: Run) -> None:
        logging.info("%s: training in %s", run.name, workdir / run.name)
        status, error = launcher.train(run, workdir / run.name)
        outcomes[run.name] = (status, error)
        logging.info("%s: %s %s", run.name, status, error)

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        for future in [pool.submit(train, run) for run in todo]:
            future.result()
    except KeyboardInterrupt:
        logging.warning("interrupted: stopping the running runs (they save a checkpoint)")
        launcher.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        write_results(workdir, _rows(runs, workdir, outcomes))
        raise
    pool.shutdown()
    rows = _rows(runs, workdir, outcomes)
    write_results(workdir, rows)
    return rows


def _rows(runs: Sequence[Run], workdir: Path, outcomes: dict[str, tuple[str, str]]) -> list[dict]:
    rows = []
    for run in runs:
        status, error = outcomes.get(run.name, ("interrupted", "not started"))
        summary = {}
        if status == "done":
            summary = json.loads((workdir / run.name / checkpoints.SUMMARY_FILE).read_text())
        rows.append(
            {
                "run": run.name,
                "status": status,
                **run.swept,
                "model": summary.get("model"),
                **{key: summary.get(key) for key in SUMMARY_COLUMNS},
                "error": error,
            }
        )
    return sorted(rows, key=lambda r: r["best_val_loss"] or math.inf)


def _format(key: str, value) -> str:
    if value is None:
        return ""
    if key in NUMBER_FORMATS:
        return NUMBER_FORMATS[key].format(value)
    return str(value).replace("|", "\\|")


def write_results(workdir: str | Path, rows: Sequence[dict]) -> None:
    """DIR/results.csv, DIR/results.md and the plots (of the runs that finished)."""
    workdir = Path(workdir)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (workdir / RESULTS_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    (workdir / RESULTS_MD).write_text(markdown_table(rows, columns) + "\n")
    done = [row for row in rows if row["status"] == "done"]
    if not done:
        return
    curves.plot_runs(
        [workdir / row["run"] for row in done], workdir / CURVES_PNG, include_train=False
    )
    for key, label, png in (
        ("num_params", "parameters", LOSS_VS_PARAMS_PNG),
        ("wall_time_s", "wall time (s)", LOSS_VS_TIME_PNG),
    ):
        points = [(row["run"], row[key], row["best_val_loss"]) for row in done]
        curves.plot_tradeoff(points, label, workdir / png)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """The rows as a Markdown table, numbers formatted for reading."""
    headers = [c.replace("train_tokens_per_sec", "tokens/s") for c in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
