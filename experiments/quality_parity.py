"""Training quality of charlm-jax against nanoGPT itself: `configs/transformer.py:nanogpt_baby`
(nanoGPT's baby GPT recipe) for each seed, alternated with runs of nanoGPT's own train.py
with its README's CPU settings (experiments/nanogpt_peer.py).

    python experiments/quality_parity.py --seeds=0,1,2 --workdir=results/parity \
        --nanogpt_dir=DIR --peer_python=/tmp/torch/bin/python

Each seed trains charlm-jax in DIR/seed=N (a sweep over `train.seed`), then nanoGPT runs
once (it seeds torch with 1337 on every run; its log in DIR/nanogpt_run=N.log). Reported per
run: the final and the best of the run's own evaluations (nanoGPT's estimate, the mean loss
of 20 random validation batches: noisy, about +-0.015 between seeds), in nats and bits per
character, and for charlm-jax also the loss of the whole validation text in consecutive
windows of the context (`scoring.score_tokens`, stride = context, best checkpoint). Wall
times: charlm-jax's is its training function's (summary.json), nanoGPT's its whole
process. DIR/parity.json holds the rows with their provenance (experiments/provenance.py);
`experiments/report.py` writes the docs' table from it.
"""

import json
import math
import statistics
import sys
from pathlib import Path

import nanogpt_peer
import provenance
from absl import app, flags, logging

from charlm_jax import cli
from charlm_jax.data import pipeline, text_files
from charlm_jax.model import scoring
from charlm_jax.training import sweeps
from charlm_jax.workdir import checkpoints
from charlm_jax.workdir.loader import open_run

flags.DEFINE_list("seeds", ["0", "1", "2"], "charlm-jax's training seeds (one nanoGPT run each).")
flags.DEFINE_string("config", "configs/transformer.py:nanogpt_baby", "The charlm-jax config.")
flags.DEFINE_multi_string("set", [], "KEY=VALUE: a charlm-jax override (repeatable).")
flags.DEFINE_string("nanogpt_dir", "", "A checkout of karpathy/nanoGPT ('': charlm-jax only).")
flags.DEFINE_string("peer_python", sys.executable, "A Python with torch, for nanoGPT.")
flags.DEFINE_multi_string("peer_set", [], "KEY=VALUE: a nanoGPT train.py override.")
flags.DEFINE_string("workdir", "results/parity", "Directory of the runs and the table.")
FLAGS = flags.FLAGS
RESULT_FILE = "parity.json"


def whole_val_loss(workdir: Path) -> float:
    """Loss (nats per token) of the validation text in back-to-back windows of the context
    (the peer's protocol: stride = context), best checkpoint."""
    run = open_run(workdir, "best")
    tokens = run.tokenizer.encode(text_files.read_text(run.config.data))
    _, val = pipeline.split_tokens(tokens, run.config.data.val_fraction, run.context_length)
    return scoring.score_tokens(
        run.model, val, run.context_length, stride=run.context_length
    ).nats_per_token


def charlm_row(run, workdir: Path) -> dict:
    """A charlm-jax run of the sweep, trained in workdir/run.name, and its scores."""
    sweeps.run_sweep([run], workdir)
    summary = json.loads((workdir / run.name / checkpoints.SUMMARY_FILE).read_text())
    evals = [r for r in summary["history"] if r["kind"] == "eval"]
    return {
        "framework": "charlm-jax", "seed": int(run.swept["train.seed"]),
        "steps": summary["steps"], "final_val_loss": evals[-1]["val_loss"],
        "best_val_loss": summary["best_val_loss"],
        "whole_val_loss": whole_val_loss(workdir / run.name),
        "wall_time_s": summary["wall_time_s"],
    }  # fmt: skip


def nanogpt_row(index: int, workdir: Path) -> dict:
    """A run of nanoGPT's train.py (its log kept in workdir) and its scores."""
    log_to = workdir / f"nanogpt_run={index}.log"
    record = nanogpt_peer.run(Path(FLAGS.nanogpt_dir), FLAGS.peer_python, "cpu_baby",
                              FLAGS.peer_set, None, log_to)  # fmt: skip
    return {
        "framework": "nanoGPT train.py", "seed": 1337, "steps": record["steps"],
        "final_val_loss": record["final_val_loss"], "best_val_loss": record["best_val_loss"],
        "whole_val_loss": None, "wall_time_s": record["process_s"], "log": log_to.name,
    }  # fmt: skip


def means(rows: list[dict]) -> list[dict]:
    """Per framework, the mean of each number over its runs."""
    out = []
    for framework in dict.fromkeys(row["framework"] for row in rows):
        mine = [row for row in rows if row["framework"] == framework]
        keys = ("final_val_loss", "best_val_loss", "whole_val_loss", "wall_time_s")
        mean = {k: statistics.mean(r[k] for r in mine) if mine[0][k] is not None else None
                for k in keys}  # fmt: skip
        out.append({"framework": framework, "runs": len(mine), **mean})
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    started = provenance.begin()
    cli.quiet_library_logs()
    workdir = Path(FLAGS.workdir)
    runs = sweeps.expand_grid(FLAGS.config, [f"train.seed={','.join(FLAGS.seeds)}"], FLAGS.set)
    rows, versions = [], {}
    if FLAGS.nanogpt_dir:
        header = nanogpt_peer.peer_header(Path(FLAGS.nanogpt_dir), FLAGS.peer_python,
                                          "cpu_baby", FLAGS.peer_set)  # fmt: skip
        versions["torch"] = header["torch"]
    with cli.StopSignals(cli.interrupt):  # SIGTERM stops it as Ctrl-C does
        for index, run in enumerate(runs):  # alternated: a shared machine's load hits both
            rows.append(charlm_row(run, workdir))
            if FLAGS.nanogpt_dir:
                logging.info("nanoGPT run %d", index)
                rows.append(nanogpt_row(index, workdir))
        sweeps.run_sweep(runs, workdir)  # all trained: only the sweep's table and plots of all
    result = {"runs": rows, "mean": means(rows), "bits_per_nat": 1 / math.log(2)}
    if FLAGS.nanogpt_dir:
        result["nanogpt"] = header
    provenance.write_json(workdir / RESULT_FILE, result, started, **versions)
    for row in result["mean"]:
        print(
            f"{row['framework']}: {row['runs']} runs, final val {row['final_val_loss']:.4f}, "
            f"best val {row['best_val_loss']:.4f} nats, {row['wall_time_s']:.1f} s"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
