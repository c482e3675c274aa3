"""Training quality of charlm-jax against the PyTorch peer (experiments/pytorch_peer.py):
the same nanoGPT model and recipe, the same seeds, both scored the same two ways.

    python experiments/quality_parity.py --seeds=0,1,2 --workdir=results/parity \
        --torch_python=/tmp/torch/bin/python

Each seed trains `configs/transformer.py:nanogpt_baby` (a sweep over `train.seed`, in
DIR/seed=N) and the peer (`pytorch_peer.py --train_steps`; its output in
DIR/torch_gelu=G_seed=N.txt).
Reported per run: the best of the run's own 20-batch evaluations (nanoGPT's estimate: noisy,
about +-0.015 between seeds), and the loss of the whole validation text in back-to-back
windows of the context (`scoring.score_tokens`, stride = context, best checkpoint; the peer
scores its final model, which is its best in these runs). Wall times differ in scope:
charlm-jax's is the whole run (start-up, compilation, evaluations of both splits,
checkpoints), the peer's its training loop and validation evaluations. DIR/parity.md holds
the table, means last.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

from absl import app, flags, logging

from charlm_jax import cli
from charlm_jax.data import pipeline, text_files
from charlm_jax.model import scoring
from charlm_jax.training import sweeps
from charlm_jax.workdir import checkpoints
from charlm_jax.workdir.loader import open_run

flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds, for both frameworks.")
flags.DEFINE_string("config", "configs/transformer.py:nanogpt_baby", "The charlm-jax config.")
flags.DEFINE_multi_string("set", [], "KEY=VALUE: a charlm-jax override (repeatable).")
flags.DEFINE_string("preset", "nanogpt_baby", "The peer's preset (the same model).")
flags.DEFINE_string("torch_python", sys.executable, "A Python with torch installed ('': skip).")
flags.DEFINE_list("gelu", ["tanh"], "The peer's GELU, tanh and/or none (charlm-jax uses tanh).")
flags.DEFINE_string("workdir", "results/parity", "Directory of the runs and the table.")
FLAGS = flags.FLAGS
PEER = Path(__file__).resolve().parent / "pytorch_peer.py"


def whole_val_loss(workdir: Path) -> float:
    """Loss (nats per token) of the validation text in back-to-back windows of the context
    (the peer's protocol: stride = context), best checkpoint."""
    run = open_run(workdir, "best")
    tokens = run.tokenizer.encode(text_files.read_text(run.config.data))
    _, val = pipeline.split_tokens(tokens, run.config.data.val_fraction, run.context_length)
    return scoring.score_tokens(
        run.model, val, run.context_length, stride=run.context_length
    ).nats_per_token


def peer_run(seed: str, gelu: str, steps: int, out: Path) -> dict:
    """Trains the PyTorch peer (or reuses its earlier output) and parses its last line:
    '... best val B (20 random batches), whole val text W, S s'."""
    if not out.exists() or "whole val text" not in out.read_text():
        command = [FLAGS.torch_python, str(PEER), f"--preset={FLAGS.preset}",
                   f"--train_steps={steps}", f"--seed={seed}", f"--gelu={gelu}"]  # fmt: skip
        logging.info("peer seed %s: %s", seed, " ".join(command))
        out.write_text(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    words = out.read_text().splitlines()[-1].replace(",", "").split()
    best = float(words[words.index("best") + 2])
    whole = float(words[words.index("text") + 1])
    return {"best_val_loss": best, "whole_val_loss": whole, "wall_time_s": float(words[-2])}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    cli.quiet_library_logs()
    workdir = Path(FLAGS.workdir)
    runs = sweeps.expand_grid(FLAGS.config, [f"train.seed={','.join(FLAGS.seeds)}"], FLAGS.set)
    with cli.StopSignals(cli.interrupt):  # SIGTERM stops it as Ctrl-C does
        sweeps.run_sweep(runs, workdir)
    rows = []
    for run, seed in zip(runs, FLAGS.seeds, strict=True):
        summary = json.loads((workdir / run.name / checkpoints.SUMMARY_FILE).read_text())
        jax_row = {
            "best_val_loss": summary["best_val_loss"],
            "whole_val_loss": whole_val_loss(workdir / run.name),
            "wall_time_s": summary["wall_time_s"],
        }
        rows.append({"framework": "charlm-jax", "seed": seed, **jax_row})
        for gelu in FLAGS.gelu if FLAGS.torch_python else ():
            out = workdir / f"torch_gelu={gelu}_seed={seed}.txt"
            peer = peer_run(seed, gelu, summary["steps"], out)
            rows.append({"framework": f"pytorch (gelu {gelu})", "seed": seed, **peer})
    for framework in dict.fromkeys(row["framework"] for row in rows):
        mine = [row for row in rows if row["framework"] == framework]
        means = {
            key: statistics.mean(row[key] for row in mine)
            for key in ("best_val_loss", "whole_val_loss", "wall_time_s")
        }
        rows.append({"framework": framework, "seed": "mean", **means})
    for row in rows:
        row["whole val text loss"] = f"{row.pop('whole_val_loss'):.4f}"
    columns = ["framework", "seed", "best_val_loss", "whole val text loss", "wall_time_s"]
    table = sweeps.markdown_table(rows, columns)
    (workdir / "parity.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser())
