"""The peer is nanoGPT itself: runs karpathy/nanoGPT's own `train.py` from a local checkout
and records what its whole process takes and what its log says.

    python experiments/nanogpt_peer.py --nanogpt_dir=DIR [--python=PY] [--runs=3] \
        [--recipe=cpu_baby|gpu] [--target=1.8857] [--out=FILE.json] [--set=max_iters=20]

Nothing of nanoGPT is copied here: DIR is a checkout (`git clone` of karpathy/nanoGPT), its
commit is recorded, and --python is a Python with torch and numpy (nanoGPT's needs). Its
`shakespeare_char` data are prepared as its `data/shakespeare_char/prepare.py` prepares them
(characters sorted into ids, the first 90% train.bin, the rest val.bin, uint16, meta.pkl),
from the tiny Shakespeare text that charlm-jax embeds (prepare.py would download the same
file), in a scratch folder where train.py runs (beside a link to its configurator.py, which
it reads from its working directory) and writes its checkpoints.

Recipes: `cpu_baby` is nanoGPT's README's CPU command (config/train_shakespeare_char.py
with --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0); `gpu` is config/train_shakespeare_char.py as it is (CUDA, torch.compile).
--set=KEY=VALUE adds train.py overrides after the recipe's.

Clocks (what charlm-jax's side is timed against): `process_s` is train.py's whole process,
from launch to exit (imports, data, compilation, evaluations, checkpoints; preparing the
.bin files is prepare.py's separate command in nanoGPT, so it is outside), and `elapsed_s` of
each evaluation is the time from launch until its line `step N: train loss X, val loss Y`
reached stdout (train.py runs unbuffered). `time_to_target_s` is the first evaluation whose
val loss is <= --target (nanoGPT evaluates every 250 steps: the time is that of the
evaluation, not of the step where the loss crossed). `iter_ms` is the median of the
per-iteration times its log prints (`iter N: loss X, time Y ms`). nanoGPT seeds torch with
1337 on every run: repeated runs time the same training.
"""

import pickle
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import provenance
from absl import app, flags

TEXT = Path(__file__).resolve().parents[1] / "charlm_jax" / "resources" / "tinyshakespeare.txt"
CONFIG = "config/train_shakespeare_char.py"
RECIPES = {
    # nanoGPT's README, "I only have a macbook" (the baby GPT on a CPU).
    "cpu_baby": ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
                 "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                 "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"],
    "gpu": [],
}  # fmt: skip
EVAL = re.compile(r"^step (\d+): train loss ([\d.]+|nan), val loss ([\d.]+|nan)$")
ITER = re.compile(r"^iter (\d+): loss ([\d.]+|nan), time ([\d.]+)ms")

FLAGS = flags.FLAGS


def prepare_data(folder: Path, text: str) -> dict:
    """Writes `text` as nanoGPT's prepare.py writes tiny Shakespeare, into
    folder/data/shakespeare_char/ (train.py reads data/DATASET relative to its working
    directory); returns the meta it pickled."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(text) * 0.9)
    out = folder / "data" / "shakespeare_char"
    out.mkdir(parents=True, exist_ok=True)
    ids[:n].tofile(out / "train.bin")
    ids[n:].tofile(out / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    with (out / "meta.pkl").open("wb") as f:
        pickle.dump(meta, f)
    return meta


def train_command(nanogpt_dir: Path, python: str, recipe: str, overrides: list[str],
                  out_dir: Path) -> list[str]:  # fmt: skip
    """nanoGPT's train.py with the recipe's settings, `overrides` (KEY=VALUE) after them."""
    extra = [f"--{o}" for o in overrides]
    return [python, "-u", str(nanogpt_dir / "train.py"), str(nanogpt_dir / CONFIG),
            *RECIPES[recipe], *extra, f"--out_dir={out_dir}"]  # fmt: skip


def read_log(text: str) -> list[tuple[float, str]]:
    """The (seconds since launch, line) pairs of a log as `run_once` writes it."""
    return [(float(t), line) for t, _, line in
            (row.strip(" ").partition(" ") for row in text.splitlines())]  # fmt: skip


def parse_log(lines: list[tuple[float, str]], target: float | None = None) -> dict:
    """The numbers of a train.py log given as (seconds since launch, line) pairs: each
    evaluation, the median iteration time and, with `target`, the first evaluation with a
    val loss <= target."""
    evals, iter_ms = [], []
    for elapsed, line in lines:
        if m := EVAL.match(line.strip()):
            step, train_loss, val_loss = int(m[1]), float(m[2]), float(m[3])
            evals.append({"step": step, "train_loss": train_loss, "val_loss": val_loss,
                          "elapsed_s": elapsed})  # fmt: skip
        elif m := ITER.match(line.strip()):
            iter_ms.append(float(m[3]))
    reached = [e for e in evals if target is not None and e["val_loss"] <= target]
    return {
        "evals": evals,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min((e["val_loss"] for e in evals), default=None),
        "steps": evals[-1]["step"] if evals else 0,
        # The first iterations include warm-up: the median is the steady step.
        "iter_ms": statistics.median(iter_ms) if iter_ms else None,
        "time_to_target_s": reached[0]["elapsed_s"] if reached else None,
        "step_at_target": reached[0]["step"] if reached else None,
    }


def run_once(command: list[str], workdir: Path, target: float | None) -> tuple[dict, str]:
    """Runs `command` in `workdir`, timing each stdout line from launch; its parsed record
    (with the whole process's time) and its log (each line after its time). A failure
    raises RuntimeError with the log's last line."""
    lines = []
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:  # fmt: skip
        for line in process.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
    process_s = time.perf_counter() - start
    log = "\n".join(f"{t:9.3f} {line}" for t, line in lines) + "\n"
    if process.returncode:
        last = lines[-1][1] if lines else "(no output)"
        raise RuntimeError(f"nanoGPT's train.py failed ({process.returncode}): {last}")
    # Parsed from the log as written (times to the ms): the log alone reproduces the record.
    return {"process_s": process_s, **parse_log(read_log(log), target)}, log


def torch_version(python: str) -> str:
    """The torch version of `python` (and its CPU threads), as that Python reports it."""
    code = "import torch; print(torch.__version__, torch.get_num_threads())"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{python} cannot import torch: {done.stderr.strip()[-200:]}")
    version, threads = done.stdout.split()
    return f"{version} ({threads} threads)"


def nanogpt_commit(nanogpt_dir: Path) -> str:
    done = subprocess.run(["git", "-C", str(nanogpt_dir), "rev-parse", "HEAD"],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode or not (nanogpt_dir / "train.py").exists():
        raise RuntimeError(f"{nanogpt_dir} is not a git checkout of nanoGPT")
    return done.stdout.strip()


def run(nanogpt_dir: Path, python: str, recipe: str, overrides: list[str],
        target: float | None, log_to: Path | None = None) -> dict:  # fmt: skip
    """One run of nanoGPT's train.py in a fresh scratch folder; its record (and its log,
    written to `log_to` when given)."""
    with tempfile.TemporaryDirectory(prefix="nanogpt_peer_") as scratch:
        prepare_data(Path(scratch), TEXT.read_text(encoding="utf-8"))
        # train.py execs configurator.py from its working directory: linked, not copied.
        (Path(scratch) / "configurator.py").symlink_to(nanogpt_dir.resolve() / "configurator.py")
        out_dir = Path(scratch) / "out"
        command = train_command(nanogpt_dir.resolve(), python, recipe, overrides, out_dir)
        record, log = run_once(command, Path(scratch), target)
    if log_to:
        log_to.parent.mkdir(parents=True, exist_ok=True)
        log_to.write_text(log)
    return record


def peer_header(nanogpt_dir: Path, python: str, recipe: str, overrides: list[str]) -> dict:
    """What identifies the peer's runs: nanoGPT's commit and the command (scratch paths
    elided), for a result file."""
    command = train_command(Path("NANOGPT"), "python", recipe, overrides, Path("SCRATCH/out"))
    return {
        "nanogpt_commit": nanogpt_commit(nanogpt_dir),
        "recipe": recipe,
        "command": "cd SCRATCH && " + shlex.join(command),
        "torch": torch_version(python),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    started = provenance.begin()
    if not FLAGS.nanogpt_dir:
        sys.exit("error: --nanogpt_dir is required (a checkout of karpathy/nanoGPT)")
    nanogpt_dir = Path(FLAGS.nanogpt_dir).expanduser()
    try:
        header = peer_header(nanogpt_dir, FLAGS.python, FLAGS.recipe, FLAGS.set)
        runs = []
        for i in range(FLAGS.runs):
            log_to = Path(FLAGS.out).with_suffix(f".run{i}.log") if FLAGS.out else None
            runs.append(run(nanogpt_dir, FLAGS.python, FLAGS.recipe, FLAGS.set, FLAGS.target,
                            log_to))  # fmt: skip
            print(summary_line(runs[-1]), flush=True)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    if FLAGS.out:
        result = {**header, "target": FLAGS.target, "runs": runs,
                  "mean_process_s": statistics.mean(r["process_s"] for r in runs)}  # fmt: skip
        provenance.write_json(FLAGS.out, result, started, torch=header["torch"])


def summary_line(record: dict) -> str:
    """One line: the whole process's time and where the run got."""
    reached = record["time_to_target_s"]
    return (
        f"nanoGPT: {record['process_s']:.1f} s whole process, {record['steps']} steps, "
        f"val {record['final_val_loss']} (best {record['best_val_loss']}), "
        f"{record['iter_ms']} ms/iter (median)"
        + (f"; target reached at {reached:.1f} s" if reached is not None else "")
    )


def define_flags() -> None:
    """This script's flags, defined only when it runs (speedrun.py imports its functions)."""
    flags.DEFINE_string("nanogpt_dir", None, "A checkout of karpathy/nanoGPT.")
    flags.DEFINE_string("python", sys.executable, "A Python with torch and numpy installed.")
    flags.DEFINE_enum("recipe", "cpu_baby", list(RECIPES), "nanoGPT's settings to run.")
    flags.DEFINE_multi_string("set", [], "KEY=VALUE: a train.py override (repeatable).")
    flags.DEFINE_integer("runs", 1, "Runs, each a fresh process.")
    flags.DEFINE_float("target", None, "Validation loss whose first evaluation is timed.")
    flags.DEFINE_string("out", "", "Write the runs and their provenance to this JSON file.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
