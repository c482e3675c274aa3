"""Sweeps: the grid, naming, validation, running tiny runs (each a subprocess), the table."""

import csv

import pytest
from conftest import ROOT, TINY_MODEL, TINY_TRAIN
from test_cli import main_in_process

from charlm_jax.errors import UserError
from charlm_jax.training import sweeps

CONFIG = str(ROOT / "configs" / "transformer.py")
SHORT = {"train.num_steps": 4, "train.eval_every": 4, "train.log_every": 4}
TINY = {**TINY_MODEL["transformer"], **TINY_TRAIN, **SHORT}


def tiny_sets(*swept: str, **changes) -> list[str]:
    """--set values for tiny runs, without the swept keys."""
    return [f"{k}={v}" for k, v in {**TINY, **changes}.items() if k not in swept]


def test_expand_grid_names_and_overrides():
    runs = sweeps.expand_grid(
        CONFIG + ":small",
        ["model.num_layers=2,4", "preset=small,medium"],
        ["train.num_steps=500"],
    )
    assert [run.name for run in runs] == [
        "num_layers=2__preset=small",
        "num_layers=2__preset=medium",
        "num_layers=4__preset=small",
        "num_layers=4__preset=medium",
    ]
    assert runs[1].config == CONFIG + ":medium"
    assert runs[1].overrides == {"train.num_steps": "500", "model.num_layers": "2"}
    assert sweeps.run_name({"model.seed": "1", "train.seed": "2"}) == "model.seed=1__train.seed=2"


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("model.num_layers", "malformed override"),
        ("model.num_layers=", "empty value"),
        ("model.num_layers=2,,4", "empty value"),
        ("model.num_layers=2,2", "repeated value"),
        ("=2", "malformed override"),
        ("num_layers=2", "dotted field"),
    ],
)
def test_malformed_sweep(sweep, message):
    with pytest.raises(UserError, match=message):
        sweeps.expand_grid(CONFIG, [sweep])


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("model.num_layers=2,x", "run num_layers=x: .*invalid literal for int"),
        # 3 heads do not divide the width 32: the model cannot be built.
        ("model.num_heads=4,3", "run num_heads=3: model.embedding_dim=32 is not divisible by "
         "num_heads=3"),
        ("train.eval_every=4,0", "run eval_every=0: train.eval_every must be positive, got 0"),
    ],
    ids=["bad-value", "num-heads", "non-positive"],
)  # fmt: skip
def test_every_config_is_checked_before_any_run(tmp_path, sweep, message):
    key = sweep.split("=")[0]
    runs = sweeps.expand_grid(CONFIG, [sweep], tiny_sets(key))
    with pytest.raises(UserError, match=message):
        sweeps.run_sweep(runs, tmp_path)
    assert not any(tmp_path.iterdir())


def test_sweep_grid_table_plots_failures_and_skip(tmp_path):
    # A NaN learning rate passes validation but diverges: those runs fail while training.
    runs = sweeps.expand_grid(
        CONFIG + ":nanogpt_baby",  # the plain model, whose parameter counts are checked
        ["model.num_layers=1,2", "train.learning_rate=3e-3,nan"],
        tiny_sets("model.num_layers", "train.learning_rate"),
    )
    rows = sweeps.run_sweep(runs, tmp_path, jobs=4)  # all at once: quicker than in turn
    assert [(row["run"], row["status"]) for row in rows[2:]] == [
        ("num_layers=1__learning_rate=nan", "failed"),
        ("num_layers=2__learning_rate=nan", "failed"),
    ]
    assert {row["error"].split(";")[0] for row in rows[2:]} == {
        "error: training diverged: loss is nan by step 4"
    }
    done = rows[:2]
    assert {row["run"] for row in done} == {
        "num_layers=1__learning_rate=3e-3",
        "num_layers=2__learning_rate=3e-3",
    }
    assert all(row["status"] == "done" and row["steps"] == 4 for row in done)
    assert done[0]["best_val_loss"] <= done[1]["best_val_loss"]
    assert {row["num_params"] for row in done} == {11392, 19648}  # 1 and 2 blocks
    with (tmp_path / sweeps.RESULTS_CSV).open() as f:
        assert [row["run"] for row in csv.DictReader(f)] == [row["run"] for row in rows]
    table = (tmp_path / sweeps.RESULTS_MD).read_text().splitlines()
    assert len(table) == 2 + 4 and "best_val_loss" in table[0]
    assert "| num_layers=2__learning_rate=nan | failed | 2 | nan |" in table[-1]
    for png in (sweeps.CURVES_PNG, sweeps.LOSS_VS_PARAMS_PNG, sweeps.LOSS_VS_TIME_PNG):
        assert (tmp_path / png).stat().st_size > 0

    # Again (the runs that worked): they are skipped, their files untouched.
    summaries = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}
    assert len(summaries) == 2
    assert sweeps.run_sweep(runs[::2], tmp_path) == done
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")} == summaries
    # Training further (more steps) counts as unfinished: it resumes.
    more_steps = sweeps.expand_grid(CONFIG, [], tiny_sets(**{"train.num_steps": 6}))[0]
    assert not sweeps.is_finished(tmp_path / done[0]["run"], sweeps.load_config(more_steps))


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("model.num_layer=1,2", "error: run num_layer=1: unknown config field 'num_layer'"),
        ("model.num_layers:1,2", "error: malformed override 'model.num_layers:1,2'"),
    ],
    ids=["unknown-key", "malformed"],
)
def test_cli_bad_input_is_one_line_before_any_run(tmp_path, capfd, sweep, message):
    args = [f"--config={CONFIG}", f"--sweep={sweep}", f"--workdir={tmp_path / 'sweep'}"]
    result = main_in_process(capfd, str(ROOT / "experiments" / "sweep.py"), *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert not (tmp_path / "sweep").exists()
