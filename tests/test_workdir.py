"""A workdir that two runs, a failing disk or a killed run cannot damage (issue 25): the
run's lock, restore errors that are not corruption, files written whole."""

import json
import os

import pytest
from conftest import tiny_config
from flax import nnx
from test_serve import random_workdir

from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.training import metrics, train
from charlm_jax.workdir import checkpoints, layout, loader


def test_a_second_run_on_a_locked_workdir_stops_naming_the_first(tmp_path, text_file):
    workdir = tmp_path / "run"
    config = tiny_config(**{"data.path": str(text_file), "train.num_steps": 2})
    with layout.locked(layout.prepare(workdir)):  # a first run, still going
        with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            train.train_and_evaluate(config, workdir)
        assert not (workdir / metrics.METRICS_FILE).exists()  # the second wrote nothing
    with layout.locked(workdir):  # released when the first ends
        pass


@pytest.fixture
def saved(tmp_path):
    """A workdir with a checkpoint at step 1, and states shaped like it."""
    workdir = random_workdir(tmp_path / "run")
    config = checkpoints.read_run_config(workdir)
    state = nnx.state(models.create_model(config, 24, nnx.Rngs(0)))
    return workdir, state


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied"),
        OSError(5, "Input/output error"),
        ValueError("PERMISSION_DENIED: Error opening file"),  # TensorStore's way
    ],
)
def test_a_restore_error_that_is_not_corruption_touches_nothing(saved, monkeypatch, error):
    workdir, state = saved

    def failing_restore(self, step, *args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "restore", failing_restore)
    expected = f"cannot restore checkpoint 1 .*{error.args[-1]}"
    with checkpoints.open_manager(workdir) as manager, pytest.raises(UserError, match=expected):
        checkpoints.restore_latest_good(manager, state, state)
    assert (workdir / "checkpoints" / "1").is_dir()
    assert not (workdir / "checkpoints_unreadable").exists()


def test_a_corrupt_checkpoint_is_moved_aside(saved, monkeypatch):
    workdir, state = saved

    def corrupt_restore(self, step, *args, **kwargs):
        raise ValueError("DATA_LOSS: Error reading local file")

    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "restore", corrupt_restore)
    expected = "no readable checkpoint"
    with checkpoints.open_manager(workdir) as manager, pytest.raises(UserError, match=expected):
        checkpoints.restore_latest_good(manager, state, state)
    assert (workdir / "checkpoints_unreadable" / "1").is_dir()


class TokenizerThatFailsHalfway(CharTokenizer):
    def save(self, path):
        path.write_text('{"kind": "ch')  # a disk that fills up, a kill
        raise OSError(28, "No space left on device")


def test_run_files_are_replaced_whole(tmp_path):
    config = tiny_config()
    checkpoints.save_run_files(tmp_path, config, CharTokenizer.from_text("abc"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = TokenizerThatFailsHalfway.from_text("abcd")
    with pytest.raises(OSError, match="No space"):
        checkpoints.save_run_files(tmp_path, config, broken)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no partial file


def test_a_torn_last_metrics_line_is_left_out(tmp_path):
    records = [{"step": 10, "kind": "train", "loss": 2.0}, {"step": 20, "kind": "eval"}]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / metrics.METRICS_FILE).write_text(text + '{"step": 30, "ki')
    assert metrics.read_history(tmp_path) == records
    log = metrics.MetricsLog(tmp_path, start_step=20)
    log.close()
    assert (tmp_path / metrics.METRICS_FILE).read_text() == text


@pytest.mark.parametrize(
    "name, text",
    [
        ("config.json", '{"model": {"name": "transformer"}}'),
        ("config.json", "[1, 2]"),
        ("tokenizer.json", '{"kind": "char"}'),
        ("tokenizer.json", "[]"),
    ],
)
def test_structurally_wrong_run_files_are_one_line(saved, name, text):
    workdir, _ = saved
    (workdir / name).write_text(text)
    with pytest.raises(UserError, match="is not one a run writes|cannot read|cannot restore"):
        loader.open_run(workdir)
