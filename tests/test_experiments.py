"""Smoke tests of the experiment scripts with tiny settings, run as a user runs them."""

import csv
import json
import subprocess
import sys

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
