"""Training you can trust: exact resume, kills, corrupt checkpoints, early stopping, logs."""

import json
import math
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from flax import nnx
from test_cli import CONFIG, TINY_FLAGS, main_in_process

from charlm_jax.checkpoints import load_model
from charlm_jax.errors import UserError
from charlm_jax.training import curves, events, train
from charlm_jax.training.metrics import read_history
from charlm_jax.workdir import checkpoints


def params_of(workdir, checkpoint="latest"):
    model, _, _ = load_model(workdir, checkpoint)
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))


def assert_same_params(a, b):
    for x, y in zip(params_of(a), params_of(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def config_for(text_file, **overrides):
    return tiny_config(**{"data.path": str(text_file), "train.eval_every": 10, **overrides})


def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path, text_file, monkeypatch):
    whole = train.train_and_evaluate(config_for(text_file), tmp_path / "whole")

    real_save = checkpoints.save

    def crash_at_step_30(manager, step, *args, **kwargs):
        if step == 30:
            raise RuntimeError("simulated crash")
        return real_save(manager, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save", crash_at_step_30)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_and_evaluate(config_for(text_file), tmp_path / "resumed")
    monkeypatch.setattr(checkpoints, "save", real_save)
    resumed = train.train_and_evaluate(config_for(text_file), tmp_path / "resumed")

    assert resumed["resumed_from_step"] == 20
    assert resumed["history"] == whole["history"]  # every evaluation, bit for bit
    assert_same_params(tmp_path / "whole", tmp_path / "resumed")
    train_records = [r for r in read_history(tmp_path / "resumed") if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [10, 20, 30, 40]  # no duplicates after resume


def run_cli(workdir, text_file, *extra, wait=True):
    args = [sys.executable, "-m", "charlm_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
            *TINY_FLAGS, f"--config.data.path={text_file}", "--config.train.eval_every=10",
            *extra]  # fmt: skip
    if wait:
        return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_checkpoint(process, workdir):
    deadline = time.time() + 120
    while not (workdir / "checkpoints").is_dir() or not any(
        p.name.isdigit() for p in (workdir / "checkpoints").iterdir()
    ):
        assert process.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def test_sigkill_then_resume_completes_with_the_same_parameters(tmp_path, text_file):
    steps = "--config.train.num_steps=200"
    process = run_cli(tmp_path / "killed", text_file, steps, wait=False)
    wait_for_checkpoint(process, tmp_path / "killed")
    time.sleep(np.random.default_rng().uniform(0, 0.5))
    process.kill()
    process.wait()
    result = run_cli(tmp_path / "killed", text_file, steps)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == 200 and summary["resumed_from_step"] is not None
    whole = run_cli(tmp_path / "whole", text_file, steps)
    assert whole.returncode == 0, whole.stderr
    assert_same_params(tmp_path / "killed", tmp_path / "whole")


def test_sigterm_saves_a_checkpoint_and_says_so(tmp_path, text_file):
    process = run_cli(tmp_path / "run", text_file, "--config.train.num_steps=100000", wait=False)
    wait_for_checkpoint(process, tmp_path / "run")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    last = stderr.decode().strip().splitlines()[-1]
    assert "interrupted by SIGTERM: checkpoint saved at step" in last
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted by SIGTERM"
    with checkpoints.open_manager(tmp_path / "run") as manager:
        assert manager.latest_step() == summary["steps"]


def test_sigint_saves_a_checkpoint_exits_and_the_run_resumes_from_it(tmp_path, text_file):
    process = run_cli(tmp_path / "run", text_file, "--config.train.num_steps=100000", wait=False)
    wait_for_checkpoint(process, tmp_path / "run")
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    last = stderr.decode().strip().splitlines()[-1]
    assert "interrupted by SIGINT: checkpoint saved at step" in last
    stopped = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stopped["stop_reason"] == "interrupted by SIGINT" and stopped["steps"] > 0
    with checkpoints.open_manager(tmp_path / "run") as manager:
        assert manager.latest_step() == stopped["steps"]
    until = stopped["steps"] + 20
    result = run_cli(tmp_path / "run", text_file, f"--config.train.num_steps={until}")
    assert result.returncode == 0, result.stderr
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (resumed["resumed_from_step"], resumed["steps"]) == (stopped["steps"], until)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, text_file):
    workdir = tmp_path / "run"
    config = config_for(text_file, **{"train.num_steps": 20, "train.keep_checkpoints": 2})
    train.train_and_evaluate(config, workdir)
    for f in (workdir / "checkpoints" / "20" / "model").rglob("*"):
        if f.is_file() and "d" in f.parts[-2:-1]:  # the array data files of OCDBT
            f.write_bytes(b"garbage")
    config.train.num_steps = 30
    summary = train.train_and_evaluate(config, workdir)
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 30
    assert (workdir / "checkpoints_unreadable" / "20").is_dir()  # kept, not deleted


def test_early_stopping_on_a_plateau(tmp_path, text_file):
    # A zero learning rate keeps the model, so every evaluation gives the same loss.
    config = config_for(
        text_file,
        **{"train.learning_rate": 0.0, "train.min_learning_rate": 0.0,
           "train.early_stopping_patience": 2},
    )  # fmt: skip
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 30
    assert summary["stop_reason"].startswith("early stopping")


def test_evals_without_improvement():
    assert train.evals_without_improvement([], 0.0) == 0
    assert train.evals_without_improvement([3.0, 2.0, 2.5, 2.1], 0.0) == 2
    assert train.evals_without_improvement([3.0, 2.0, 1.95], 0.1) == 1
    assert train.evals_without_improvement([3.0, 2.0, 1.8], 0.1) == 0


def test_epochs_set_the_number_of_steps(tmp_path, text_file):
    config = config_for(text_file, **{"train.num_epochs": 0.5, "train.eval_every": 1000})
    summary = train.train_and_evaluate(config, tmp_path / "run")
    train_tokens = int(len(text_file.read_text()) * 0.9)
    assert summary["steps"] == math.ceil(0.5 * train_tokens / (8 * 32))


def test_diverging_loss_stops_with_a_clear_error(tmp_path, text_file):
    config = config_for(text_file, **{"train.learning_rate": float("nan")})
    with pytest.raises(UserError, match="training diverged: loss is nan by step 10"):
        train.train_and_evaluate(config, tmp_path / "run")


def event_records(path):
    """The records of a TFRecord file, each one's framing and checksums checked."""
    raw, records = path.read_bytes(), []
    while raw:
        (length,) = struct.unpack("<Q", raw[:8])
        record = raw[12 : 12 + length]
        assert struct.unpack("<I", raw[8:12])[0] == events.masked_crc32c(raw[:8])
        assert struct.unpack("<I", raw[12 + length : 16 + length])[0] == events.masked_crc32c(
            record
        )
        records.append(record)
        raw = raw[16 + length :]
    return records


def kept_figures(monkeypatch) -> list:
    """The matplotlib figures that `curves.save_figure` writes from now on (still written)."""
    figures, save = [], curves.save_figure

    def keep(fig, path, dpi=100):
        figures.append(fig)
        save(fig, path, dpi)

    monkeypatch.setattr(curves, "save_figure", keep)
    return figures


def lines_by_label(fig) -> dict:
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


def evals(summary: dict, key: str) -> tuple[list, list]:
    records = [r for r in summary["history"] if r["kind"] == "eval"]
    return [r["step"] for r in records], [r[key] for r in records]


def test_event_files_and_plots(tmp_path, text_file, monkeypatch, capfd):
    assert events.masked_crc32c(b"123456789") == 0xC78AB0E5  # CRC-32C's check value, masked
    figures = kept_figures(monkeypatch)
    summaries = [
        train.train_and_evaluate(config_for(text_file, **{"train.num_steps": 20}), tmp_path / name)
        for name in ("a", "b")
    ]
    files = list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    records = event_records(files[0])
    assert b"brain.Event:2" in records[0]  # the file version comes first
    for tag, value in (("eval/val_loss", summaries[0]["final_val_loss"]), ("train/loss", None)):
        # Summary.Value{tag = 1, simple_value = 2 (float32)}
        field = bytes([0x0A, len(tag)]) + tag.encode() + b"\x15"
        if value is not None:
            field += struct.pack("<f", value)
        assert any(field in r for r in records), tag
    png = tmp_path / "a" / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    out = tmp_path / "both.png"
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    result = main_in_process(capfd, "charlm_jax.plot", *runs, f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    # What the plots show: run a's loss curve, then both runs overlaid.
    ax = figures[0].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "loss (nats per character)")
    lines = lines_by_label(figures[0])
    steps, val = evals(summaries[0], "val_loss")
    assert steps == [10, 20]
    assert (
        list(lines["val loss"].get_xdata()) == steps and list(lines["val loss"].get_ydata()) == val
    )
    assert list(lines["train loss"].get_ydata()) == evals(summaries[0], "train_loss")[1]
    best = lines[f"best {min(val):.4f}"]
    assert (list(best.get_xdata()), list(best.get_ydata())) == (
        [steps[val.index(min(val))]],
        [min(val)],
    )
    assert list(lines["train (running)"].get_xdata()) == [10, 20]  # the log steps
    curves.plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "both_here.png")
    lines = lines_by_label(figures[-1])
    assert set(lines) == {"a val", "a train", "b val", "b train"}
    for name, summary in zip("ab", summaries, strict=True):
        assert list(lines[f"{name} val"].get_ydata()) == evals(summary, "val_loss")[1]
        assert list(lines[f"{name} train"].get_ydata()) == evals(summary, "train_loss")[1]


def test_disk_full_at_save_time_is_a_clear_error(tmp_path, text_file, monkeypatch):
    workdir = tmp_path / "run"
    train.train_and_evaluate(config_for(text_file, **{"train.num_steps": 10}), workdir)

    def disk_full(self, step, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(
        UserError, match=r"cannot write checkpoint 20 .*No space left on device.*\[10\]"
    ):
        train.train_and_evaluate(config_for(text_file, **{"train.num_steps": 20}), workdir)
    monkeypatch.undo()
    assert params_of(workdir)  # step 10 still loads
