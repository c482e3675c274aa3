"""float32 vs int8 vs pruned vs pruned + int8: quality, size and decode speed.

    python experiments/benchmark_quant.py --workdir=RUN [--pruned=RUN_PRUNED] \
        [--speed_preset=nanogpt] [--out=results/quant]

Quality (trained runs): bits per character of the whole validation text in back-to-back
windows of the context (`scoring.score_tokens`, stride = context), greedy next-token
agreement with the float32 model over the same positions, and the model checkpoint's size on
disk (the int8 one exported to a temporary workdir). Speed: decode engine tokens/s at batch
1, 16 and 64 on the `--speed_preset` shape with random weights (pruned: half the MLP width),
each variant in its own process, rounds alternated, medians. Writes OUT/benchmark_quant.json
and OUT/quality_vs_speed.png.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ruff: noqa: E402 (the imports below need ROOT on the path)
import provenance

from charlm_jax.data import pipeline
from charlm_jax.decoding import engine
from charlm_jax.model import int8, models, scoring
from charlm_jax.workdir import checkpoints
from charlm_jax.workdir.int8_export import export_int8
from charlm_jax.workdir.loader import open_run
from configs import transformer

flags.DEFINE_multi_string("workdir", [], "Trained runs to score (repeat the flag).")
flags.DEFINE_multi_string("pruned", [], "Their pruned copies (python -m charlm_jax.prune).")
flags.DEFINE_string("speed_preset", "nanogpt", "configs/transformer.py preset for speed.")
flags.DEFINE_multi_integer("batch", [1, 16, 64], "Engine batch sizes (slots).")
flags.DEFINE_integer("tokens", 100, "Tokens decoded per row in a speed measurement.")
flags.DEFINE_integer("rounds", 3, "Speed rounds (processes alternated).")
flags.DEFINE_string("out", "results/quant", "Output folder.")
flags.DEFINE_string("speed_worker", None, "Internal: measure one variant and print JSON.")
FLAGS = flags.FLAGS
VARIANTS = ("float32", "int8", "pruned", "pruned+int8")


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quality(workdir: Path, mode: str, reference: np.ndarray | None) -> dict:
    """bpc, agreement with `reference` predictions, size on disk of one variant."""
    run = open_run(workdir, "best", mode)
    dataset = pipeline.load_dataset(run.config.data, run.tokenizer)
    score = scoring.score_tokens(
        run.model, dataset.val, run.context_length, stride=run.context_length, top_k=1,
        chars_per_token=dataset.chars_per_token,
    )  # fmt: skip
    predicted = score.top_ids[:, 0]
    if mode == "none":
        size = _disk(workdir / checkpoints.CHECKPOINT_DIR / str(run.step) / "model")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            size = _disk(export_int8(workdir, Path(tmp) / "int8") / "model")
    row = {
        "bpc": score.bits_per_char,
        "size_bytes": size,
        "stored_values": models.count_params(run.model),  # int8 models: scales included
        "predictions": predicted,
    }
    if reference is not None:
        row["agreement"] = float((predicted == reference).mean())
    return row


def _tokens_per_s(eng: engine.Engine, batch: int, n: int) -> float:
    requests = [engine.Request(np.array([1], np.int32), n, seed=i) for i in range(batch)]
    start = time.perf_counter()
    total = sum(len(o.tokens) for outs in eng.generate(requests) for _, o in outs)
    return total / (time.perf_counter() - start)


def speed_worker(variant: str) -> None:
    """Prints {batch: tokens/s} for one variant (run in its own process)."""
    config = transformer.get_config(FLAGS.speed_preset)
    config.model.dropout_rate = 0.0
    if variant.startswith("pruned"):
        config.model.hidden_dim //= 2
    model = models.create_model(config, 65, nnx.Rngs(0))
    model = int8.quantize_model(model, "int8" if variant.endswith("int8") else "none")
    context = config.data.context_length
    result = {}
    for batch in FLAGS.batch:
        eng = engine.Engine(model, context, num_slots=batch)
        eng.warm_up()  # int8 or float32 dots, whichever is faster here (as the server runs)

        _tokens_per_s(eng, batch, engine.STEPS_PER_CALL)  # compiles
        result[batch] = _tokens_per_s(eng, batch, FLAGS.tokens)
    print(json.dumps(result))


def speed() -> dict:
    runs = {v: [] for v in VARIANTS}
    for _ in range(FLAGS.rounds):
        for variant in VARIANTS:
            args = [sys.executable, __file__, f"--speed_worker={variant}",
                    f"--speed_preset={FLAGS.speed_preset}", f"--tokens={FLAGS.tokens}",
                    *[f"--batch={b}" for b in FLAGS.batch]]  # fmt: skip
            out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(variant, runs[variant][-1], flush=True)
    return {
        v: {str(b): float(np.median([r[str(b)] for r in rs])) for b in FLAGS.batch}
        for v, rs in runs.items()
    }


def plot(results: dict, path: Path) -> None:
    from charlm_jax.training import curves  # noqa: PLC0415 (matplotlib only where a plot is drawn)

    fig, ax = curves.plt.subplots(figsize=(6, 4))
    batch = str(max(FLAGS.batch))
    for run, rows in results["quality"].items():
        for variant, row in rows.items():
            tps = results["speed"][variant][batch]
            ax.scatter(tps, row["bpc"], label=f"{Path(run).name} {variant}")
            ax.annotate(variant, (tps, row["bpc"]), fontsize=7)
    ax.set_xlabel(f"engine tokens/s at batch {batch} ({FLAGS.speed_preset} shape)")
    ax.set_ylabel("validation bits per character")
    ax.legend(fontsize=6)
    curves.save_figure(fig, path, dpi=120)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.speed_worker:
        speed_worker(FLAGS.speed_worker)
        return
    started = provenance.begin()
    results = {"quality": {}, "speed": speed() if FLAGS.rounds else {}}
    pruned = FLAGS.pruned + [None] * (len(FLAGS.workdir) - len(FLAGS.pruned))
    for workdir, pruned_dir in zip(FLAGS.workdir, pruned, strict=True):
        rows = {"float32": quality(Path(workdir), "none", None)}
        reference = rows["float32"]["predictions"]
        rows["int8"] = quality(Path(workdir), "int8", reference)
        if pruned_dir:
            rows["pruned"] = quality(Path(pruned_dir), "none", reference)
            rows["pruned+int8"] = quality(Path(pruned_dir), "int8", reference)
        for row in rows.values():
            del row["predictions"]
        results["quality"][workdir] = rows
        print(workdir, json.dumps(rows, indent=1), flush=True)
    out = Path(FLAGS.out)
    provenance.write_json(out / "benchmark_quant.json", results, started)
    if results["quality"] and results["speed"]:
        plot(results, out / "quality_vs_speed.png")


if __name__ == "__main__":
    app.run(main)
