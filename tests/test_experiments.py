"""Smoke tests of the experiment scripts with tiny settings, run as a user runs them; the
provenance of their result files and the tables experiments/report.py makes of them; the
nanoGPT peer (its log parser on a real log, its data, and nanoGPT's train.py itself where a
checkout and torch are at hand: NANOGPT_DIR=DIR and torch importable)."""

import csv
import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_TRAIN
from test_cli import main_in_process

sys.path.insert(0, str(ROOT / "experiments"))  # the scripts import their sibling modules
import nanogpt_peer  # noqa: E402
import provenance  # noqa: E402

SHORT = {**TINY_TRAIN, "train.num_steps": 2, "train.eval_every": 2, "train.log_every": 2}


def run_script(capfd, script: str, *args: str) -> subprocess.CompletedProcess:
    """`python experiments/SCRIPT args`, in this process; it must succeed."""
    result = main_in_process(capfd, str(ROOT / "experiments" / script), *args)
    assert result.returncode == 0, result.stderr
    return result


def test_demo_trains_and_samples_at_three_temperatures(tmp_path, capfd):
    tiny = {**SHORT, "model.embedding_dim": 32, "model.hidden_dim": 64}
    result = run_script(
        capfd,
        "demo.py",
        f"--workdir={tmp_path}",
        "--max_new_tokens=8",
        *(f"--config.{k}={v}" for k, v in tiny.items()),
    )
    assert "val loss" in result.stdout and "bits/char" in result.stdout
    for t in ("0.5", "0.8", "1"):
        assert f"--- temperature {t} ---\nROMEO:" in result.stdout
    assert (tmp_path / "loss_curve.png").exists()
    assert provenance.missing(json.loads((tmp_path / provenance.FILE).read_text())) == []


def test_compare_matches_parameters_and_samples_each_model(tmp_path, capfd):
    result = run_script(
        capfd,
        "compare_mlp_transformer.py",
        f"--workdir={tmp_path}",
        "--seconds=0",
        "--jobs=2",
        "--max_new_tokens=8",
        *(f"--set={k}={v}" for k, v in SHORT.items()),
    )
    with (tmp_path / "results.csv").open() as f:
        params = {row["run"]: int(row["num_params"]) for row in csv.DictReader(f)}
    assert set(params) == {"transformer", "mlp"}
    assert abs(params["mlp"] - params["transformer"]) / params["transformer"] < 0.02
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["runs"][1]["overrides"]["model.hidden_dim"]
    samples = (tmp_path / "samples.md").read_text()
    assert "## transformer" in samples and "## mlp" in samples and "ROMEO:" in samples
    assert "| transformer |" in result.stdout and (tmp_path / "val_curves.png").exists()
    record = json.loads((tmp_path / provenance.FILE).read_text())
    assert provenance.missing(record) == [] and record["table"] == "results.csv"


NANOGPT_DIR = os.environ.get("NANOGPT_DIR", "")
needs_nanogpt = pytest.mark.skipif(
    not (NANOGPT_DIR and importlib.util.find_spec("torch")),
    reason="needs NANOGPT_DIR (a karpathy/nanoGPT checkout) and torch",
)
# nanoGPT's train.py at a size that runs in seconds: 4 steps, evaluations at 0, 2 and 4.
TINY_NANOGPT = ["max_iters=4", "lr_decay_iters=4", "warmup_iters=1", "eval_interval=2",
                "eval_iters=2", "n_layer=1", "n_head=2", "n_embd=16", "block_size=16",
                "batch_size=4"]  # fmt: skip
TINY_JAX = {**SHORT, "model.embedding_dim": 32, "model.hidden_dim": 64}


@pytest.fixture(scope="module")
def report():
    """experiments/report.py as a module (loaded once: it defines an absl flag)."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "experiments" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_parity_scores_charlm_jax_with_provenance(tmp_path, report, monkeypatch, capfd):
    workdir = tmp_path / "parity"
    run_script(
        capfd,
        "quality_parity.py", f"--workdir={workdir}", "--seeds=0",
        "--config=configs/transformer.py", *(f"--set={k}={v}" for k, v in TINY_JAX.items()),
    )  # fmt: skip
    record = json.loads((workdir / "parity.json").read_text())
    assert provenance.missing(record) == []
    assert record["provenance"]["command"].startswith("python experiments/quality_parity.py ")
    (row,) = record["runs"]
    assert row["framework"] == "charlm-jax" and row["seed"] == 0
    assert 3.0 < row["whole_val_loss"] < 5.0  # 2 steps from random weights: about log(65)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    table = report.render("parity")
    assert f"| charlm-jax | {row['final_val_loss']:.4f} |" in table
    assert f"| {row['final_val_loss'] / math.log(2):.4f} |" in table  # bits per character
    assert "`python experiments/quality_parity.py --workdir=" in table


def test_benchmark_sampling_writes_runs_the_decoding_table_renders(
    tmp_path, report, monkeypatch, capfd
):
    out = tmp_path / "decoding" / "benchmark_sampling.json"
    run_script(
        capfd,
        "benchmark_sampling.py", "--runs=nanogpt_baby:2", "--new_tokens=nanogpt_baby:70",
        "--repeats=1", "--notorch", f"--out={out}",
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert provenance.missing(record) == []
    (run,) = record["runs"]
    assert (run["preset"], run["batch"], run["new_tokens"]) == ("nanogpt_baby", 2, 70)
    # The weights (804,096 float32) and 2 rows' keys and values over a mean window: 70
    # tokens in a context of 64 fill it once (rebuilt to 33 columns).
    per_column = 2 * 4 * 128 * 4
    window = (sum(range(2, 65)) + sum(range(34, 40))) / 69
    assert run["step_bytes"] - 2 * per_column * window == pytest.approx(4 * 804_096)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    table = report.render("decoding")
    assert f"| nanogpt_baby | 2 | 70 | {run['engine_median']:,.0f} | - | - |" in table


def test_report_tables_match_the_committed_results(capfd):
    result = run_script(capfd, "report.py", "--check")
    assert result.stdout.strip() == "stale: none"


def write_sweep(results, rows: list[dict]) -> None:
    """A sweep's results.csv under results/compare and its provenance."""
    folder = results / "compare"
    folder.mkdir(parents=True)
    with (folder / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    provenance.write_json(folder / provenance.FILE, {"table": "results.csv"}, provenance.begin())


def test_report_rewrites_a_stale_table_and_refuses_an_unknown_one(tmp_path, report, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    stale = "a\n<!-- report:compare -->\n| run |\n<!-- /report:compare -->\nb\n"
    text, changed = report.rewrite(stale)  # nothing measured yet: the command
    assert changed == ["compare"] and "Not measured yet: run `python experiments/compare" in text
    rows = [{"run": "mlp", "num_params": "78485", "status": "done", "error": "", "model": "m"}]
    write_sweep(tmp_path, rows)
    text, changed = report.rewrite(text)
    assert changed == ["compare"]
    assert text.startswith("a\n<!-- report:compare -->\n\n| run | num_params |")
    assert "| mlp | 78,485 |" in text and text.endswith("<!-- /report:compare -->\nb\n")
    assert f"commit {provenance.begin()['commit'][:7]}" in text
    assert report.rewrite(text) == (text, [])
    with pytest.raises(ValueError, match="no table 'nothing'"):
        report.rewrite("<!-- report:nothing -->\n<!-- /report:nothing -->")


def run_report_check(report, monkeypatch, page) -> str:
    """report.py --check over `page` alone; its exit message ('' if it passed)."""
    monkeypatch.setattr(report, "pages", lambda: [page])
    monkeypatch.setattr(report, "ROOT", page.parent)
    report.FLAGS(["report.py", "--check"])
    try:
        report.main(["report.py"])
    except SystemExit as e:
        return str(e.code)
    finally:
        report.FLAGS.unparse_flags()
    return ""


def test_report_check_fails_without_provenance_or_on_a_stale_table(tmp_path, report, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(report, "RESULTS", results)
    write_sweep(results, [{"run": "mlp", "num_params": "1", "status": "done", "error": ""}])
    page = tmp_path / "page.md"
    page.write_text(report.rewrite("<!-- report:compare -->\n<!-- /report:compare -->\n")[0])
    assert run_report_check(report, monkeypatch, page) == ""
    page.write_text(page.read_text().replace("| mlp | 1 |", "| mlp | 2 |"))  # hand-edited
    assert "stale tables (run python experiments/report.py): page.md:compare" in (
        run_report_check(report, monkeypatch, page)
    )
    record = json.loads((results / "compare" / provenance.FILE).read_text())
    del record["provenance"]["machine"]
    (results / "compare" / provenance.FILE).write_text(json.dumps(record))
    message = run_report_check(report, monkeypatch, page)
    assert "compare/provenance.json lacks provenance (machine)" in message


def test_nanogpt_log_parser_reads_a_real_log():
    # tests/fixtures/nanogpt_train_tiny.log: nanoGPT's train.py (commit 3adf61e1) with its
    # README's CPU settings and --max_iters=20 --eval_interval=10, as run_once logs it.
    log = (ROOT / "tests" / "fixtures" / "nanogpt_train_tiny.log").read_text()
    lines = nanogpt_peer.read_log(log)
    assert lines[0] == (
        3.221,
        "Overriding config with NANOGPT/config/train_shakespeare_char.py:",
    )
    parsed = nanogpt_peer.parse_log(lines, target=3.75)
    assert [(e["step"], e["val_loss"], e["elapsed_s"]) for e in parsed["evals"]] == [
        (0, 4.1649, 40.421), (10, 3.7418, 77.797), (20, 3.5745, 130.831)
    ]  # fmt: skip
    assert parsed["evals"][2]["train_loss"] == 3.5510 and parsed["steps"] == 20
    assert (parsed["time_to_target_s"], parsed["step_at_target"]) == (77.797, 10)
    assert parsed["final_val_loss"] == parsed["best_val_loss"] == 3.5745
    times = [float(line.split("time ")[1].split("ms")[0]) for _, line in lines if " time " in line]
    assert len(times) == 21 and parsed["iter_ms"] == np.median(times)
    assert nanogpt_peer.parse_log(lines, target=1.0)["time_to_target_s"] is None


def test_nanogpt_data_are_what_its_prepare_py_writes(tmp_path):
    meta = nanogpt_peer.prepare_data(tmp_path, nanogpt_peer.TEXT.read_text(encoding="utf-8"))
    folder = tmp_path / "data" / "shakespeare_char"
    train = np.fromfile(folder / "train.bin", dtype=np.uint16)
    val = np.fromfile(folder / "val.bin", dtype=np.uint16)
    # The counts nanoGPT's data/shakespeare_char/prepare.py prints for tiny Shakespeare.
    assert (meta["vocab_size"], len(train), len(val)) == (65, 1003854, 111540)
    with (folder / "meta.pkl").open("rb") as f:
        assert pickle.load(f) == meta
    assert "".join(meta["itos"][i] for i in train[:6]) == "First "


@needs_nanogpt
def test_nanogpt_peer_runs_nanogpt_train_py(tmp_path, report, monkeypatch, capfd):
    out = tmp_path / "full_runs" / "nanogpt.json"
    result = run_script(
        capfd,
        "nanogpt_peer.py", f"--nanogpt_dir={NANOGPT_DIR}", f"--out={out}", "--target=10",
        *(f"--set={s}" for s in TINY_NANOGPT),
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert provenance.missing(record) == [] and "torch" in record["provenance"]["versions"]
    head = subprocess.run(["git", "-C", NANOGPT_DIR, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert record["nanogpt_commit"] == head
    (run,) = record["runs"]
    assert [e["step"] for e in run["evals"]] == [0, 2, 4] and run["steps"] == 4
    assert 0 < run["evals"][0]["elapsed_s"] < run["evals"][-1]["elapsed_s"] < run["process_s"]
    assert run["time_to_target_s"] == run["evals"][0]["elapsed_s"]  # every loss is below 10
    log = (tmp_path / "full_runs" / "nanogpt.run0.log").read_text()
    assert nanogpt_peer.parse_log(nanogpt_peer.read_log(log), 10.0) == {
        k: v for k, v in run.items() if k != "process_s"
    }
    assert "nanoGPT: " in result.stdout
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    table = report.render("full_runs")
    assert f"nanoGPT `train.py`, cpu_baby (commit {head[:7]})" in table
    assert f"| {run['process_s']:.1f} |" in table


@needs_nanogpt
def test_quality_parity_alternates_with_nanogpt(tmp_path, report, monkeypatch, capfd):
    workdir = tmp_path / "parity"
    run_script(
        capfd,
        "quality_parity.py", f"--workdir={workdir}", "--seeds=0,1",
        "--config=configs/transformer.py", f"--nanogpt_dir={NANOGPT_DIR}",
        *(f"--peer_set={s}" for s in TINY_NANOGPT),
        *(f"--set={k}={v}" for k, v in TINY_JAX.items()),
    )  # fmt: skip
    record = json.loads((workdir / "parity.json").read_text())
    assert provenance.missing(record) == [] and "torch" in record["provenance"]["versions"]
    frameworks = [row["framework"] for row in record["runs"]]
    assert frameworks == ["charlm-jax", "nanoGPT train.py"] * 2
    peer = record["runs"][1]
    assert peer["steps"] == 4 and peer["whole_val_loss"] is None
    assert (workdir / peer["log"]).exists() and (workdir / "nanogpt_run=1.log").exists()
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    table = report.render("parity")
    mean = record["mean"][1]["final_val_loss"]
    assert f"| nanoGPT train.py | {peer['final_val_loss']:.4f} / " in table
    assert f"| {mean:.4f} |" in table and table.count("| - |") == 1


@needs_nanogpt
def test_speedrun_times_nanogpt_after_each_seed(tmp_path, report, monkeypatch, capfd):
    out = tmp_path / "speedrun" / "records" / "1.json"
    tiny = [f"--set={k}={v}" for k, v in TINY_JAX.items() if k != "train.num_steps"]
    run_script(
        capfd,
        "speedrun.py", *tiny, "--seeds=0,1", "--target=4.0", "--check_every=2",
        "--gate=inf", f"--nanogpt_dir={NANOGPT_DIR}", f"--out={out}", "--label=tiny",
        *(f"--peer_set={s}" for s in TINY_NANOGPT),
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert provenance.missing(record) == [] and "torch" in record["provenance"]["versions"]
    peer = record["peer"]
    assert len(peer["runs"]) == 2 and peer["runs"][0]["steps"] == 4
    assert "--max_iters=4" in peer["command"] and peer["torch"].startswith(
        record["provenance"]["versions"]["torch"].split()[0]
    )
    assert peer["mean_process_s"] == np.mean([r["process_s"] for r in peer["runs"]])
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    table = report.render("speedrun")
    ratio = record["mean"]["wall_to_target_s"] / peer["mean_process_s"]
    assert "| tiny | " in table and f"| {ratio:.2f} |" in table
    assert f"nanoGPT `train.py` (commit {peer['nanogpt_commit'][:7]})" in table


@pytest.mark.parametrize("args", [[], ["--nanogpt_dir={tmp}"]], ids=["no-dir", "not-nanogpt"])
def test_nanogpt_peer_bad_input_is_one_line(tmp_path, args):
    result = subprocess.run(
        [sys.executable, "experiments/nanogpt_peer.py", *(a.format(tmp=tmp_path) for a in args)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and ("--nanogpt_dir" in line or "not a git checkout" in line)
