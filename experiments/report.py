"""Writes every results table of README.md and docs/*.md from the files that the measuring
commands wrote under results/, between the markers `<!-- report:NAME -->` and
`<!-- /report:NAME -->`.

    python experiments/report.py          # rewrite the tables
    python experiments/report.py --check  # rewrite nothing; exit 1 naming the stale tables

Every table but `presets` (the config files' presets) shows measured numbers, so its source
files must carry the provenance that experiments/provenance.py writes: the command, commit,
date, machine, versions and load. A table whose sources lack it is an error (also for
--check); a table whose sources are not committed yet renders as one line naming the command
that measures it. NAME is one of TABLES below; each says where its files are and which
command writes them.
"""

import csv
import dataclasses
import json
import math
import re
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import provenance
from absl import app, flags

from charlm_jax.training import sweeps

flags.DEFINE_bool("check", False, "Only compare: exit 1 if a committed table is stale.")
FLAGS = flags.FLAGS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
MARKER = re.compile(r"(<!-- report:([\w-]+) -->\n)(.*?)(<!-- /report:\2 -->)", re.S)
BITS_PER_NAT = 1 / math.log(2)
NANOGPT = "python experiments/nanogpt_peer.py --nanogpt_dir=DIR --python=PY"


@dataclasses.dataclass(frozen=True)
class Table:
    """A measured table: its source files (a glob under results/), the commands that write
    them, and the markdown it makes of their records (each a JSON object with provenance)."""

    sources: str
    commands: tuple[str, ...]
    render: Callable[[list[dict]], str]


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


def _slashed(values, form: str = "{}") -> str:
    return " / ".join(form.format(v) for v in values)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def provenance_line(record: dict) -> str:
    """Where a source's numbers come from, in one line."""
    p = record["provenance"]
    m, v = p["machine"], p["versions"]
    machine = f"{m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB"
    machine += "".join(f", {gpu}" for gpu in m["gpus"])
    software = ", ".join(f"{name} {version}" for name, version in v.items() if version)
    load = f"load {p['load_before'][0]:.1f} before, {p['load_after'][0]:.1f} after"
    commit = p["commit"][:7] + (" with uncommitted changes" if p["dirty"] else "")
    return f"`{p['command']}`: {p['date']}, commit {commit}; {machine}; {software}; {load}."


def sweep_table(name: str) -> Callable[[list[dict]], str]:
    """A sweep's results.csv as its results.md has it, less the columns that say nothing."""

    def render(_: list[dict]) -> str:
        with (RESULTS / name / sweeps.RESULTS_CSV).open() as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        hidden = {"model"}
        if all(row["status"] == "done" for row in rows):
            hidden |= {"status", "error"}
        return sweeps.markdown_table(rows, [c for c in rows[0] if c not in hidden])

    return render


def demo_table(_: list[dict]) -> str:
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


def _full_runs(record: dict) -> tuple[str, list[dict]]:
    """A whole-process run file's label and its runs: run_overhead.py's (one charlm-jax
    run) or nanogpt_peer.py's (nanoGPT's train.py, several)."""
    if "nanogpt_commit" in record:
        label = f"nanoGPT `train.py`, {record['recipe']} (commit {record['nanogpt_commit'][:7]})"
        return label, record["runs"]
    run = {**record, "process_s": record["wall_s"]}
    return f"charlm-jax `{record['preset']}`", [run]


def full_runs_table(records: list[dict]) -> str:
    """Whole training runs, launch to exit, charlm-jax's and nanoGPT's, in one table."""
    by_label: dict[str, list[dict]] = {}
    for record in records:
        label, runs = _full_runs(record)
        by_label.setdefault(label, []).extend(runs)
    rows = [
        {
            "run": label,
            "whole process, s (each run)": _slashed((r["process_s"] for r in runs), "{:.1f}"),
            "mean s": f"{_mean(r['process_s'] for r in runs):.1f}",
            "steps": _slashed(dict.fromkeys(r["steps"] for r in runs)),
            "final val loss (each run)": _slashed((r["final_val_loss"] for r in runs), "{:.4f}"),
            "final val bits/char (mean)": (
                f"{BITS_PER_NAT * _mean(r['final_val_loss'] for r in runs):.4f}"
            ),
        }
        for label, runs in by_label.items()
    ]
    return sweeps.markdown_table(rows, list(rows[0]))


def parity_table(records: list[dict]) -> str:
    """Per framework: each run's final validation estimate, its mean in nats and bits per
    character, the best estimate's mean and the whole validation text's."""
    (record,) = records
    rows = []
    for mean in record["mean"]:
        mine = [r for r in record["runs"] if r["framework"] == mean["framework"]]
        whole = mean["whole_val_loss"]
        rows.append({
            "framework": mean["framework"],
            "final val, each run": _slashed((r["final_val_loss"] for r in mine), "{:.4f}"),
            "mean (nats)": f"{mean['final_val_loss']:.4f}",
            "bits/char": f"{BITS_PER_NAT * mean['final_val_loss']:.4f}",
            "best val, mean": f"{mean['best_val_loss']:.4f}",
            "whole val text, mean": "-" if whole is None else f"{whole:.4f}",
        })  # fmt: skip
    return sweeps.markdown_table(rows, list(rows[0]))


def _peer_row(peer: dict, target: float) -> dict:
    reached = [p["time_to_target_s"] for p in peer["runs"]]
    return {
        "record": f"nanoGPT `train.py` (commit {peer['nanogpt_commit'][:7]})",
        f"s to val <= {target:g}, each run": _slashed(
            "-" if t is None else f"{t:.1f}" for t in reached
        ),
        "whole process s, mean": f"{peer['mean_process_s']:.1f}",
        "of nanoGPT's whole process": "1",
        "steps": _slashed(dict.fromkeys(p["steps"] for p in peer["runs"])),
        "whole val text": "-",
    }


def speedrun_table(records: list[dict]) -> str:
    """The speedrun's record table: each record (its seeds each in a fresh process) after the
    runs of nanoGPT's train.py alternated with its seeds; the ratio is whole process over
    nanoGPT's whole process, means."""
    rows = []
    for run in sorted(records, key=lambda r: r["provenance"]["date"]):
        seeds = run["runs"]
        if "peer" in run:
            rows.append(_peer_row(run["peer"], run["target"]))
        process = run["mean"].get("process_s")
        rows.append({
            "record": run["label"],
            f"s to val <= {run['target']:g}, each run": _slashed(
                (r["wall_to_target_s"] for r in seeds), "{:.1f}"
            ),
            "whole process s, mean": "-" if process is None else f"{process:.1f}",
            "of nanoGPT's whole process": (
                f"{process / run['peer']['mean_process_s']:.2f}"
                if "peer" in run and process is not None else "-"
            ),
            "steps": _slashed(r["steps"] for r in seeds),
            "whole val text": _slashed((r["whole_val_loss"] for r in seeds), "{:.4f}"),
        })  # fmt: skip
    return sweeps.markdown_table(rows, list(rows[0]))


def ablation_table(records: list[dict]) -> str:
    """The speedrun's changes added in turn (files named in order): each row's seeds' steps
    and seconds to the target, and whole processes."""
    rows = []
    for run in records:
        seeds = run["runs"]
        rows.append({
            "change": run["label"],
            "steps, each seed": _slashed(r["steps"] for r in seeds),
            "steps, mean": f"{run['mean']['steps']:.0f}",
            f"s to val <= {run['target']:g}, each seed": _slashed(
                (r["wall_to_target_s"] for r in seeds), "{:.1f}"
            ),
            "whole process s, mean": f"{run['mean']['process_s']:.1f}",
            "ms/step, mean": f"{run['mean']['step_ms']:.0f}",
        })  # fmt: skip
    return sweeps.markdown_table(rows, list(rows[0]))


def quant_quality_table(records: list[dict]) -> str:
    """Validation bpc, agreement with float32 and size of each variant of each trained run."""
    rows = []
    for run, variants in records[0]["quality"].items():
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


def quant_speed_table(records: list[dict]) -> str:
    """Engine tokens/s of each variant by batch, and its ratio to float32."""
    speed = records[0]["speed"]
    rows = []
    for variant, by_batch in speed.items():
        row = {"variant": variant}
        for batch, rate in by_batch.items():
            row[f"batch {batch}"] = f"{rate:,.0f} ({rate / speed['float32'][batch]:.2f}x)"
        rows.append(row)
    return sweeps.markdown_table(rows, list(rows[0]))


def decoding_table(records: list[dict]) -> str:
    """Decode tokens/s of the engine and of the PyTorch loop by shape and batch, and the
    engine's share of the machine's copy bandwidth (experiments/benchmark_sampling.py)."""
    rows = []
    for run in (run for record in records for run in record["runs"]):
        theirs = run["torch_median"]
        steps_per_s = run["engine_median"] / run["batch"]
        rows.append({
            "shape": run["preset"], "batch": run["batch"], "new tokens": run["new_tokens"],
            "engine tok/s": f"{run['engine_median']:,.0f}",
            "torch tok/s": "-" if theirs is None else f"{theirs:,.0f}",
            "ratio": "-" if theirs is None else f"{run['engine_median'] / theirs:.2f}x",
            "engine bandwidth": f"{run['step_bytes'] * steps_per_s / run['copy_bandwidth']:.1%}",
        })  # fmt: skip
    return sweeps.markdown_table(rows, list(rows[0]))


def _sweep(name: str, command: str) -> Table:
    return Table(f"{name}/{provenance.FILE}", (command,), sweep_table(name))


QUANT = (
    "python experiments/benchmark_quant.py --workdir=RUN_BABY --pruned=RUN_BABY_P50 "
    "--workdir=RUN_DEFAULT --out=results/quant",
)
TABLES: dict[str, Table] = {
    "full_runs": Table(
        "full_runs/*.json",
        (
            "python experiments/run_overhead.py --preset=nanogpt_baby --config.train.seed=N "
            "--out=results/full_runs/charlm_seed=N.json",
            f"{NANOGPT} --runs=3 --out=results/full_runs/nanogpt.json",
        ),
        full_runs_table,
    ),
    "parity": Table(
        "parity/parity.json",
        (
            "python experiments/quality_parity.py --seeds=0,1,2 --workdir=results/parity "
            "--nanogpt_dir=DIR --peer_python=PY",
        ),
        parity_table,
    ),
    "speedrun": Table(
        "speedrun/records/*.json",
        (
            "python experiments/speedrun.py --nanogpt_dir=DIR --peer_python=PY "
            "--out=results/speedrun/records/NAME.json --label=WHAT",
        ),
        speedrun_table,
    ),
    "speedrun_ablation": Table(
        "speedrun/ablation/*.json",
        (
            "python experiments/speedrun.py --set=... "
            "--out=results/speedrun/ablation/N_NAME.json --label=WHAT",
        ),
        ablation_table,
    ),
    "demo": Table(
        f"demo/{provenance.FILE}",
        ("python experiments/demo.py --workdir=results/demo",),
        demo_table,
    ),
    "sweep_small": _sweep(
        "sweep_small",
        "python experiments/sweep.py --config=configs/transformer.py:small "
        "--sweep=model.num_layers=2,4 --sweep=model.position=learned,rope "
        "--set=train.num_steps=500 --set=train.eval_every=100 --workdir=results/sweep_small",
    ),
    "sweep_default": _sweep(
        "sweep_default",
        "python experiments/sweep.py --config=configs/transformer.py:speedrun "
        "--sweep=model.num_layers=4,6 --sweep=data.context_length=64,128,256 "
        "--set=train.num_steps=100000 --set=train.time_budget_s=285 --set=train.eval_every=250 "
        "--set=train.log_every=100 --workdir=results/sweep_default",
    ),
    "compare": _sweep(
        "compare",
        "python experiments/compare_mlp_transformer.py "
        "--transformer=configs/transformer.py:small --mlp=configs/mlp.py:small --seconds=120 "
        "--workdir=results/compare",
    ),
    **{
        f"presets_{kind}": _sweep(
            f"presets_{kind}",
            f"python experiments/sweep.py --config=configs/{kind}.py "
            "--sweep=preset=small,medium,large --set=train.num_steps=200 "
            f"--set=train.eval_every=50 --workdir=results/presets_{kind}",
        )
        for kind in ("transformer", "mlp")
    },
    "quant_quality": Table("quant/benchmark_quant.json", QUANT, quant_quality_table),
    "quant_speed": Table("quant/benchmark_quant.json", QUANT, quant_speed_table),
    "decoding": Table(
        "decoding/*.json",
        (
            "python experiments/benchmark_sampling.py "
            "--out=results/decoding/benchmark_sampling.json",
        ),
        decoding_table,
    ),
}


def render(name: str) -> str:
    """The markdown of table `name`; ValueError if no table has that name or a source of it
    lacks provenance."""
    if name == "presets":
        return presets_table()
    if name not in TABLES:
        raise ValueError(f"no table {name!r}: report.py's TABLES names the tables")
    table = TABLES[name]
    paths = sorted(RESULTS.glob(table.sources))
    if not paths:
        commands = " and ".join(f"`{command}`" for command in table.commands)
        return f"Not measured yet: run {commands}, then `python experiments/report.py`."
    records = [json.loads(path.read_text()) for path in paths]
    for path, record in zip(paths, records, strict=True):
        if absent := provenance.missing(record):
            where = path.relative_to(ROOT)
            raise ValueError(f"table {name!r}: {where} lacks provenance ({', '.join(absent)})")
    lines = "\n".join(f"- {provenance_line(record)}" for record in records)
    return f"{table.render(records)}\n\nMeasured by:\n\n{lines}"


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
    stale = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        try:
            new, changed = rewrite(text)
        except ValueError as e:
            sys.exit(f"error: {page.relative_to(ROOT)}: {e}")
        stale += [f"{page.relative_to(ROOT)}:{name}" for name in changed]
        if changed and not FLAGS.check:
            page.write_text(new, encoding="utf-8")
    if FLAGS.check and stale:
        sys.exit(f"error: stale tables (run python experiments/report.py): {', '.join(stale)}")
    print(f"{'stale' if FLAGS.check else 'rewrote'}: {', '.join(stale) or 'none'}")


if __name__ == "__main__":
    app.run(main)
