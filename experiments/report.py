"""Writes every results table of README.md and docs/*.md from the committed files under
results/, between the markers `<!-- report:NAME -->` and `<!-- /report:NAME -->`.

    python experiments/report.py          # rewrite the tables
    python experiments/report.py --check  # rewrite nothing; exit 1 naming the stale tables

NAME is one of:
- a sweep's folder under results/ (`sweep_small`, `compare`, `presets_mlp`, ...): its
  results.csv, without the `model` column (and `status`/`error` when every run finished);
- `parity`: results/parity/parity.md (experiments/quality_parity.py) by framework, seeds in
  one cell, then the means;
- `demo`: results/demo/summary.json (experiments/demo.py), its evaluations;
- `presets`: the presets of configs/transformer.py and configs/mlp.py;
- `quant_quality`, `quant_speed`: results/quant/benchmark_quant.json
  (experiments/benchmark_quant.py), per trained run and variant, and engine tokens/s;
- a file results/measurements/NAME.json: a measurement made before its script wrote a result
  file, transcribed with the commands that measure it and the machine it ran on.
"""

import csv
import json
import re
import runpy
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags

from charlm_jax.training import sweeps

flags.DEFINE_bool("check", False, "Only compare: exit 1 if a committed table is stale.")
FLAGS = flags.FLAGS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
MEASUREMENTS = RESULTS / "measurements"
MARKER = re.compile(r"(<!-- report:([\w-]+) -->\n)(.*?)(<!-- /report:\2 -->)", re.S)


def pages() -> list[Path]:
    """The markdown files whose tables this script writes."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sweep_table(name: str) -> str:
    """A sweep's results.csv as its results.md has it, less the columns that say nothing."""
    with (RESULTS / name / sweeps.RESULTS_CSV).open() as f:
        rows = [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(f)]
    hidden = {"model"}
    if all(row["status"] == "done" for row in rows):
        hidden |= {"status", "error"}
    return sweeps.markdown_table(rows, [c for c in rows[0] if c not in hidden])


def parity_table() -> str:
    """Per framework: the best 20-batch validation loss of each seed, its mean, and the mean
    loss of the whole validation text."""
    lines = (RESULTS / "parity" / "parity.md").read_text().splitlines()
    header, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    rows = [dict(zip(header, row, strict=True)) for row in rows if not set(row[0]) <= {"-"}]
    out = []
    for framework in dict.fromkeys(row["framework"] for row in rows):
        mine = {row["seed"]: row for row in rows if row["framework"] == framework}
        mean = mine.pop("mean")
        out.append({
            "framework": framework,
            f"best val (20 batches), seeds {' / '.join(mine)}": " / ".join(
                row["best_val_loss"] for row in mine.values()
            ),
            "mean": mean["best_val_loss"],
            "whole validation text, mean": mean["whole val text loss"],
        })  # fmt: skip
    return sweeps.markdown_table(out, list(out[0]))


def demo_table() -> str:
    """The demo run's size, speed and evaluations."""
    summary = json.loads((RESULTS / "demo" / "summary.json").read_text())
    caption = (
        f"{summary['num_params']:,} parameters, {summary['steps']} steps, "
        f"{summary['wall_time_s']:.0f} s, {summary['train_tokens_per_sec']:,.0f} tokens/s:"
    )
    rows = [
        {
            "step": r["step"],
            "train loss": f"{r['train_loss']:.4f}",
            "val loss": f"{r['val_loss']:.4f}",
            "bits/char": f"{r['val_bpc']:.3f}",
        }
        for r in summary["history"]
        if r["kind"] == "eval"
    ]
    return caption + "\n\n" + sweeps.markdown_table(rows, list(rows[0]))


def _model_column(config) -> str:
    m = config.model
    if m.name == "mlp":
        return f"MLP, {m.window}-character window"
    return "Transformer" + (", RoPE" if m.position == "rope" else "")


def presets_table() -> str:
    """Every preset of the config files, as `get_config(preset)` builds it."""
    rows = []
    for file in ("transformer.py", "mlp.py"):
        module = runpy.run_path(str(ROOT / "configs" / file))
        for preset in module["PRESETS"]:
            config = module["get_config"](preset)
            m, sizes = config.model, [config.model.embedding_dim, config.model.hidden_dim]
            sizes += [m.num_layers] + ([m.num_heads] if m.name == "transformer" else [])
            rows.append({
                "preset": f"`{file}:{preset}`",
                "model": _model_column(config),
                "embedding / hidden / layers (/ heads)": " / ".join(map(str, sizes)),
                "dropout": m.dropout_rate,
                "context": config.data.context_length,
                "batch": config.train.batch_size,
                "steps": config.train.num_steps,
                "learning rate": config.train.learning_rate,
            })  # fmt: skip
    return sweeps.markdown_table(rows, list(rows[0]))


def measurement_table(name: str) -> str:
    """A transcribed measurement: its table, then its commands and machine."""
    record = json.loads((MEASUREMENTS / f"{name}.json").read_text())
    rows = [dict(zip(record["columns"], row, strict=True)) for row in record["rows"]]
    commands = " and ".join(f"`{command}`" for command in record["commands"])
    table = sweeps.markdown_table(rows, record["columns"])
    return f"{table}\n\nMeasured by {commands}; {record['measured']}."


def _speedrun_records() -> list[dict]:
    """The runs of experiments/speedrun.py kept in results/speedrun/records/*.json, by name."""
    files = sorted((RESULTS / "speedrun" / "records").glob("*.json"))
    return [json.loads(p.read_text()) for p in files]


def _command(run: dict) -> str:
    """The command that reproduces a speedrun run (without where it kept the result)."""
    kept = [w for w in shlex.split(run["command"]) if not w.startswith(("--out=", "--label="))]
    return f"`{shlex.join(kept)}`"


def _slashed(values, form: str = "{}") -> str:
    return " / ".join(form.format(v) for v in values)


def speedrun_table() -> str:
    """The speedrun's record table, one row per record (seeds each timed in a fresh process),
    after the PyTorch peer's nanoGPT recipe, timed alternated with the first record's seeds."""
    rows = []
    for run in _speedrun_records():
        seeds = run["runs"]
        if "peer" in run and not rows:
            peer = run["peer"]
            rows.append({
                "record": "nanoGPT's recipe (the PyTorch peer, its whole run)",
                "seconds, per seed": _slashed((p["process_s"] for p in peer["runs"]), "{:.1f}"),
                "mean": f"{peer['mean_process_s']:.1f}",
                "of the peer's time (its runs in the same sitting)": "1",
                "steps": 2000,
                "whole val text": _slashed((p["whole_val_loss"] for p in peer["runs"]), "{:.4f}"),
                "date": run["date"], "commit": "", "command": f"`{peer['command']}`",
            })  # fmt: skip
        rows.append({
            "record": run["label"],
            "seconds, per seed": _slashed((r["wall_to_target_s"] for r in seeds), "{:.1f}"),
            "mean": f"{run['mean']['wall_to_target_s']:.1f}",
            "of the peer's time (its runs in the same sitting)": (
                f"{run['mean']['wall_to_target_s'] / run['peer']['mean_process_s']:.2f} "
                f"({run['peer']['mean_process_s']:.1f} s)" if "peer" in run else "-"
            ),
            "steps": _slashed(r["steps"] for r in seeds),
            "whole val text": _slashed((r["whole_val_loss"] for r in seeds), "{:.4f}"),
            "date": run["date"], "commit": run["commit"], "command": _command(run),
        })  # fmt: skip
    return sweeps.markdown_table(rows, list(rows[0]))


def _quant_results() -> dict:
    return json.loads((RESULTS / "quant" / "benchmark_quant.json").read_text())


def quant_quality_table() -> str:
    """Validation bpc, agreement with float32 and size of each variant of each trained run."""
    rows = []
    for run, variants in _quant_results()["quality"].items():
        base = variants["float32"]["bpc"]
        for variant, r in variants.items():
            delta = "" if variant == "float32" else f" ({r['bpc'] - base:+.4f})"
            rows.append({
                "run": Path(run).name, "variant": variant, "val bpc": f"{r['bpc']:.4f}{delta}",
                "agreement": f"{100 * r['agreement']:.2f}%" if "agreement" in r else "-",
                "size on disk": f"{r['size_bytes'] / 1e6:.2f} MB",
                "stored values": f"{r['stored_values']:,}",
            })  # fmt: skip
    return sweeps.markdown_table(rows, list(rows[0]))


def quant_speed_table() -> str:
    """Engine tokens/s of each variant by batch, and its ratio to float32."""
    speed = _quant_results()["speed"]
    rows = []
    for variant, by_batch in speed.items():
        row = {"variant": variant}
        for batch, rate in by_batch.items():
            ratio = rate / speed["float32"][batch]
            row[f"batch {batch}"] = f"{rate:,.0f} ({ratio:.2f}x)"
        rows.append(row)
    return sweeps.markdown_table(rows, list(rows[0]))


TABLES: dict[str, Callable[[], str]] = {
    "parity": parity_table,
    "demo": demo_table,
    "presets": presets_table,
    "speedrun": speedrun_table,
    "quant_quality": quant_quality_table,
    "quant_speed": quant_speed_table,
}


def render(name: str) -> str:
    """The markdown of table `name`; ValueError if nothing produces it."""
    if name in TABLES:
        return TABLES[name]()
    if (MEASUREMENTS / f"{name}.json").exists():
        return measurement_table(name)
    if (RESULTS / name / sweeps.RESULTS_CSV).exists():
        return sweep_table(name)
    raise ValueError(f"no results for table {name!r}: not a sweep under results/ nor a file")


def rewrite(text: str) -> tuple[str, list[str]]:
    """`text` with every marked table regenerated, and the names of the tables that changed."""
    changed = []

    def replace(match: re.Match) -> str:
        start, name, old, end = match.groups()
        new = f"\n{render(name)}\n\n"
        if new != old:
            changed.append(name)
        return start + new + end

    return MARKER.sub(replace, text), changed


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    stale, shown = [], set()
    for page in pages():
        text = page.read_text(encoding="utf-8")
        shown |= {match.group(2) for match in MARKER.finditer(text)}
        try:
            new, changed = rewrite(text)
        except ValueError as e:
            sys.exit(f"error: {page.relative_to(ROOT)}: {e}")
        stale += [f"{page.relative_to(ROOT)}:{name}" for name in changed]
        if changed and not FLAGS.check:
            page.write_text(new, encoding="utf-8")
    unshown = sorted({p.stem for p in MEASUREMENTS.glob("*.json")} - shown)
    if unshown:
        sys.exit(f"error: results/measurements/ files shown on no page: {', '.join(unshown)}")
    if FLAGS.check and stale:
        sys.exit(f"error: stale tables (run python experiments/report.py): {', '.join(stale)}")
    print(f"{'stale' if FLAGS.check else 'rewrote'}: {', '.join(stale) or 'none'}")


if __name__ == "__main__":
    app.run(main)
