"""A training run's overhead: its wall time, start to exit, minus steps x median step time.

    python experiments/run_overhead.py [--preset=nanogpt_baby] [--workdir=/tmp/overhead] \
        [--config.train.num_steps=500 ...]

Runs `python -m charlm_jax.main` in a fresh workdir and prints one JSON line (with --out,
also writes it with its provenance, experiments/provenance.py, to that file): wall time,
steps, the median step time (over the log intervals, from DIR/metrics.jsonl), the overhead
(start-up, compilation, evaluations, checkpoints, plots, exit), and the final losses (to
check that a change made only to the overhead leaves them bit-identical).
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import provenance

ROOT = Path(__file__).resolve().parents[1]


def interval_step_times(records: list[dict], tokens_per_step: int) -> list[float]:
    """Seconds per step in each log interval, from the cumulative tokens/s of the train
    records (tokens/s = tokens_per_step * timed steps / train seconds)."""
    train = [r for r in records if r["kind"] == "train"]
    seconds = [r["step"] * tokens_per_step / r["tokens_per_sec"] for r in train]
    steps = [r["step"] for r in train]
    return [
        (s1 - s0) / (n1 - n0)
        for s0, s1, n0, n1 in zip([0.0, *seconds], seconds, [0, *steps], steps, strict=False)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nanogpt_baby")
    parser.add_argument("--workdir", default="/tmp/charlm_overhead")
    parser.add_argument("--out", default="", help="also write the result to this JSON file")
    args, overrides = parser.parse_known_args()
    started = provenance.begin()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "-m", "charlm_jax.main",
               f"--config=configs/transformer.py:{args.preset}", f"--workdir={workdir}",
               *overrides]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: the run failed: {result.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((workdir / "summary.json").read_text())
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    median = statistics.median(interval_step_times(records, summary["tokens_per_step"]))
    result = {
        "preset": args.preset, "wall_s": round(wall, 2), "steps": summary["steps"],
        "median_step_ms": round(1000 * median, 3),
        "overhead_s": round(wall - summary["steps"] * median, 2),
        "final_train_loss": summary["final_train_loss"],
        "final_val_loss": summary["final_val_loss"], "best_val_loss": summary["best_val_loss"],
    }  # fmt: skip
    print(json.dumps(result))
    if args.out:
        provenance.write_json(args.out, result, started)


if __name__ == "__main__":
    main()
