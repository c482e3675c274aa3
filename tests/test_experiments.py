"""Smoke tests of the experiment scripts with tiny settings, run as a user runs them."""

import csv
import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_TRAIN

SHORT = {**TINY_TRAIN, "train.num_steps": 2, "train.eval_every": 2, "train.log_every": 2}


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, f"experiments/{script}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_demo_trains_and_samples_at_three_temperatures(tmp_path):
    tiny = {**SHORT, "model.embedding_dim": 32, "model.hidden_dim": 64}
    result = run_script(
        "demo.py",
        f"--workdir={tmp_path}",
        "--max_new_tokens=8",
        *(f"--config.{k}={v}" for k, v in tiny.items()),
    )
    assert "val loss" in result.stdout and "bits/char" in result.stdout
    for t in ("0.5", "0.8", "1"):
        assert f"--- temperature {t} ---\nROMEO:" in result.stdout
    assert (tmp_path / "loss_curve.png").exists()


def test_compare_matches_parameters_and_samples_each_model(tmp_path):
    result = run_script(
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


def test_quality_parity_scores_both_frameworks(tmp_path):
    fake_python = tmp_path / "fake_python"  # stands in for a Python with torch
    fake_python.write_text(
        "#!/bin/sh\necho 'step 2: val loss 2.5'\n"
        "echo 'pytorch nanogpt_baby seed 0 gelu tanh: best val 2.5000 (20 random batches), "
        "whole val text 2.6000, 3 s'\n"
    )
    fake_python.chmod(0o755)
    tiny = {**SHORT, "model.embedding_dim": 32, "model.hidden_dim": 64}
    result = run_script(
        "quality_parity.py",
        f"--workdir={tmp_path / 'parity'}",
        "--seeds=0",
        "--config=configs/transformer.py",
        f"--torch_python={fake_python}",
        *(f"--set={k}={v}" for k, v in tiny.items()),
    )
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if "|" in line]
    jax_row = next(r for r in rows if r[0].strip() == "charlm-jax" and r[1].strip() == "0")
    whole = float(jax_row[3])
    assert 3.0 < whole < 5.0  # 2 steps from random weights: about log(65) = 4.17 nats
    torch_row = next(r for r in rows if r[0].strip().startswith("pytorch") and r[1].strip() == "0")
    assert [float(torch_row[2]), float(torch_row[3])] == [2.5, 2.6]
    assert (tmp_path / "parity" / "parity.md").read_text().strip() == result.stdout.strip()


def test_report_tables_match_the_committed_results():
    result = run_script("report.py", "--check")
    assert result.stdout.strip() == "stale: none"


def test_report_rewrites_a_stale_table_and_refuses_an_unknown_one():
    spec = importlib.util.spec_from_file_location("report", ROOT / "experiments" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    stale = "a\n<!-- report:compare -->\n| run |\n<!-- /report:compare -->\nb\n"
    text, changed = report.rewrite(stale)
    assert changed == ["compare"]
    assert text.startswith("a\n<!-- report:compare -->\n\n| run | num_params |")
    assert "| mlp | 78,485 |" in text and text.endswith("<!-- /report:compare -->\nb\n")
    assert report.rewrite(text) == (text, [])
    with pytest.raises(ValueError, match="no results for table 'nothing'"):
        report.rewrite("<!-- report:nothing -->\n<!-- /report:nothing -->")
