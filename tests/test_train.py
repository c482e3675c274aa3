import json
import math
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from charlm_jax.checkpoints import load_model
from charlm_jax.data import batching, pipeline
from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.training import parallel, train
from charlm_jax.training.metrics import read_history
from charlm_jax.workdir import checkpoints


@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_loss_decreases_below_unigram_entropy(tmp_path, text_file, name):
    """After 150 steps the model beats every context-free predictor of the text."""
    config = tiny_config(
        name,
        **{
            "data.path": str(text_file),
            "train.num_steps": 150,
            "train.batch_size": 16,
            "train.eval_every": 50,
        },
    )
    summary = train.train_and_evaluate(config, tmp_path / "run")
    val_losses = [h["val_loss"] for h in summary["history"]]
    _, counts = np.unique(list(text_file.read_text()), return_counts=True)
    p = counts / counts.sum()
    unigram_entropy = -(p * np.log(p)).sum()  # 3.28 nats
    assert val_losses[-1] < val_losses[0]
    assert val_losses[-1] < unigram_entropy - 0.25


def test_summary_and_workdir_layout(tmp_path, text_file):
    config = tiny_config(**{"data.path": str(text_file)})
    workdir = tmp_path / "run"
    summary = train.train_and_evaluate(config, workdir)
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk == summary
    for key in (
        "num_params",
        "steps",
        "final_train_loss",
        "final_val_loss",
        "best_val_loss",
        "train_tokens_per_sec",
        "wall_time_s",
        "num_devices",
    ):
        assert on_disk[key] is not None, key
    assert summary["steps"] == 40 and summary["num_devices"] == jax.device_count()
    assert summary["best_val_loss"] == min(h["val_loss"] for h in summary["history"])
    assert summary["best_val_bpc"] == pytest.approx(summary["best_val_loss"] / np.log(2))
    assert [h["step"] for h in summary["history"]] == [20, 40]
    assert (workdir / "config.json").exists() and (workdir / "tokenizer.json").exists()
    best_step = min(summary["history"], key=lambda h: h["val_loss"])["step"]
    kept = {int(p.name) for p in (workdir / "checkpoints").iterdir()}
    assert kept == {40, best_step}  # the latest and the best


def test_reloaded_checkpoint_reproduces_the_eval_loss(trained_run):
    """The latest checkpoint, loaded back, gives exactly the loss the run measured."""
    config, summary = trained_run.config(), trained_run.summary
    model, tokenizer, loaded_config = load_model(trained_run.workdir, "latest")
    assert loaded_config.to_dict() == config.to_dict()
    text = Path(config.data.path).read_text()
    _, val = pipeline.split_tokens(tokenizer.encode(text), 0.1, 32)
    eval_step = train.make_eval_step(nnx.graphdef(model), parallel.make_mesh())
    eval_key = jax.random.split(jax.random.key(config.train.seed))[1]
    val_batches = batching.eval_batches_numpy(val, eval_key, 8, 32, 2)
    val_loss = float(eval_step(nnx.state(model), val_batches))
    assert val_loss == summary["final_val_loss"]


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    config = tiny_config()
    model = models.create_model(config, 13, nnx.Rngs(3))
    opt = nnx.Optimizer(model, train.create_optimizer(config.train)[0], wrt=nnx.Param)
    tokenizer = CharTokenizer([chr(ord("a") + i) for i in range(13)])
    checkpoints.save_run_files(tmp_path, config, tokenizer)
    with checkpoints.open_manager(tmp_path) as manager:
        checkpoints.save(manager, 7, nnx.state(model), nnx.state(opt), val_loss=1.5)
    loaded, loaded_tokenizer, _ = load_model(tmp_path, "best")
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 13)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))
    assert loaded_tokenizer.chars == tokenizer.chars
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path, 7)[0](tokens)), model(tokens))
    with pytest.raises(UserError, match="no checkpoint at step 8"):
        load_model(tmp_path, 8)


def test_load_model_without_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no checkpoints in"):
        load_model(tmp_path)


def test_rerun_resumes_and_keeps_the_best_checkpoint(tmp_path, trained_run):
    workdir = trained_run.copy(tmp_path / "run")
    config = trained_run.config()
    config.train.num_steps = 40
    second = train.train_and_evaluate(config, workdir)
    assert second["resumed_from_step"] == 20 and second["steps"] == 40
    history = second["history"]
    assert [h["step"] for h in history] == [10, 20, 30, 40]  # the whole run's evaluations
    assert history[:2] == trained_run.summary["history"]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    best_step = min(history, key=lambda h: h["val_loss"])["step"]
    assert best_step in steps and 40 in steps
    assert second["best_val_loss"] == min(h["val_loss"] for h in history)


def test_rerun_with_another_model_is_refused(tmp_path, trained_run):
    trained_run.copy(tmp_path / "run")
    config = trained_run.config()
    config.model.num_layers = 1
    with pytest.raises(UserError, match="different model .model.num_layers: 2 there, 1 now"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "20").is_dir()


def test_learning_rate_schedule():
    config = tiny_config(**{"train.num_steps": 100, "train.warmup_steps": 10}).train
    _, schedule = train.create_optimizer(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(config.learning_rate)
    assert float(schedule(100)) == pytest.approx(config.min_learning_rate)
    assert config.min_learning_rate < float(schedule(55)) < config.learning_rate


def test_memory_mapped_corpus_trains_exactly_like_in_memory(tmp_path, text_file, trained_run):
    """Host-drawn, prefetched batches from the token cache are the on-device batches."""
    device = trained_run.summary  # the same text, in memory, batches drawn on the device
    mapped = trained_run.config()
    mapped.data.path, mapped.data.memmap_above_mb = str(text_file), 0.0
    host = train.train_and_evaluate(mapped, tmp_path / "host")
    assert len(list(tmp_path.glob("text.txt.*.tokens"))) == 1
    for a, b in zip(device["history"], host["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    # Bits per character: loss / ln 2 for the character tokenizer.
    assert host["val_chars_per_token"] == 1.0 and host["tokenizer"] == "char"
    assert host["history"][-1]["val_bpc"] == pytest.approx(host["final_val_loss"] / np.log(2))


def test_both_splits_evaluated_in_one_call_give_each_splits_loss():
    """Stacked splits in one call: each split's loss exactly as a call of its own gives it."""
    config = tiny_config()
    model = models.create_model(config, 13, nnx.Rngs(0))
    eval_step = train.make_eval_step(nnx.graphdef(model), parallel.make_mesh())
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 3000), 0, 13))
    key = jax.random.key(2)
    splits = [batching.eval_batches_numpy(t, key, 8, 32, 3) for t in tokens]
    stacked = jax.tree.map(lambda *x: np.stack(x), *splits)
    together = np.asarray(eval_step(nnx.state(model), stacked))
    alone = [float(eval_step(nnx.state(model), split)) for split in splits]
    assert together.shape == (2,) and together.tolist() == alone
    assert alone[0] != alone[1]


def test_learning_rate_is_computed_in_the_step(trained_run):
    """The logged learning rate (the train step's) is the host schedule's at that step, and
    the step applies it: at step 0 warmup's rate is 0 and the parameters do not move."""
    config = trained_run.config()
    _, schedule = train.create_optimizer(config.train)
    records = [r for r in read_history(trained_run.workdir) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [10, 20]
    for r in records:  # the rate of the interval's last step (counted from 0)
        assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)
    mesh = parallel.make_mesh()
    step, _, model_state, opt_state, _ = train.build_training(config, 13, mesh)
    before = jax.device_get(model_state)
    tokens = jax.random.randint(jax.random.key(0), (500,), 0, 13)
    args = (tokens, jax.random.key(1), jnp.int32(config.train.num_steps))
    model_state, opt_state, metrics = step(model_state, opt_state, *args)
    assert float(metrics.compute()["lr"]) == 0.0
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(model_state), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    model_state, _, metrics = step(model_state, opt_state, *args)
    assert float(schedule(1)) > 0
    assert float(metrics.compute()["lr"]) == pytest.approx(float(schedule(1)), rel=1e-6)
    assert any(
        not np.array_equal(x, np.asarray(y))
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(model_state), strict=True)
    )


def test_time_budget_stops_training_and_the_summary_says_why(tmp_path, text_file):
    config = tiny_config(**{"data.path": str(text_file), "train.num_steps": 1000,
                            "train.time_budget_s": 0.001})  # fmt: skip
    summary = train.train_and_evaluate(config, tmp_path / "run")
    # Spent before the first log (step 10): the run evaluates, checkpoints and stops there.
    assert summary["stop_reason"] == "time budget: 0.001 s"
    assert summary["steps"] == 10 and summary["history"][-1]["step"] == 10
    assert (tmp_path / "run" / "checkpoints" / "10").is_dir()


def _budget_run(tmp_path, text_file, monkeypatch, step_seconds, log_every: int,
                budget_s: float = 100.0):  # fmt: skip
    """A wsd run with a budget of `budget_s` on a clock that only moves in steps, step N
    taking step_seconds(N): (its summary, its config)."""
    clock, steps = [0.0], [0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def one_step():
        steps[0] += 1
        clock[0] += step_seconds(steps[0])

    config = tiny_config(**{
        "data.path": str(text_file), "train.num_steps": 1000, "train.time_budget_s": budget_s,
        "train.schedule": "wsd", "train.eval_every": 1000, "train.log_every": log_every,
    })  # fmt: skip
    return train.train_and_evaluate(config, tmp_path / "run", one_step), config


def test_time_budget_schedule_decays_to_the_estimated_end(tmp_path, text_file, monkeypatch):
    """On a clock that moves 1 s per step, the budget's steps are known: 11 timed steps,
    then what the 50 s leave after the final evaluation and checkpoint, over 1 s a step (and
    each step's share of the evaluations). The wsd schedule's decay ends exactly there, and
    the logged rates are the schedule fitted to it."""
    summary, config = _budget_run(tmp_path, text_file, monkeypatch, lambda n: 1.0,
                                  log_every=1, budget_s=50.0)  # fmt: skip
    eval_s = 2 * config.train.eval_batches / 3  # estimated from the step time (1 s)
    end = 11 + math.floor((50 - 11 - 2 * eval_s) / (1 + eval_s / 1000))
    assert summary["steps"] == summary["schedule_steps"] == end
    assert summary["stop_reason"] == "time budget: 50 s"
    _, schedule = train.create_optimizer(config.train)
    lrs = {r["step"]: r["lr"] for r in read_history(tmp_path / "run") if r["kind"] == "train"}
    for step in range(12, end + 1):  # after the estimate: the schedule ends at `end`
        assert lrs[step] == pytest.approx(float(schedule(step - 1, end)), rel=1e-6)
    assert float(schedule(end, end)) == pytest.approx(config.train.min_learning_rate)
    decay = round(config.train.decay_fraction * end)
    assert lrs[end - decay] == pytest.approx(config.train.learning_rate)  # the last held
    assert lrs[end] < lrs[end - 1] < config.train.learning_rate


def test_time_budget_estimates_again_when_the_first_timing_was_fast(
    tmp_path, text_file, monkeypatch
):
    """The ten timed steps run at 0.8 s and every other at 1 s: the first estimate (step 121)
    overshoots the 100 s, and the next ones move the schedule's end to step 99, which ends
    at 97 s, leaving the final evaluation's reserve (2 x 1.33 s)."""
    summary, _ = _budget_run(tmp_path, text_file, monkeypatch,
                             lambda n: 0.8 if 2 <= n <= 11 else 1.0, log_every=1)  # fmt: skip
    assert summary["steps"] == summary["schedule_steps"] == 99
    assert summary["stop_reason"] == "time budget: 100 s" and summary["wall_time_s"] <= 100


def test_time_budget_follows_steps_that_slow_during_the_decay(tmp_path, text_file, monkeypatch):
    """Steps slow from 1 s to 1.1 s after step 60, inside the decay: the end fixed before
    (step 97) would end at 100.7 s; the estimates at the logs of steps 70, 80 and 90 move it
    to step 93 (96.3 s)."""
    summary, _ = _budget_run(tmp_path, text_file, monkeypatch,
                             lambda n: 1.1 if n > 60 else 1.0, log_every=10)  # fmt: skip
    assert summary["steps"] == summary["schedule_steps"] == 93
    assert summary["wall_time_s"] <= 100


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.name": "rnn"}, "unknown model.name 'rnn'"),
        ({"model.position": "sinusoid"}, "unknown model.position 'sinusoid'"),
        ({"data.tokenizer": "wordpiece"}, "data.tokenizer must be one of .*, got 'wordpiece'"),
        ({"data.context_length": 0}, "data.context_length must be positive, got 0"),
        ({"data.val_fraction": 1.0}, r"data.val_fraction must be in \(0, 1\), got 1.0"),
        ({"train.optimizer": "sgd"}, "unknown train.optimizer 'sgd'"),
        ({"train.schedule": "linear"}, "unknown train.schedule 'linear'"),
        ({"train.schedule": "wsd", "train.decay_fraction": 0.0}, "train.decay_fraction must be"),
        ({"train.warmup_steps": -1}, "train.warmup_steps must be >= 0, got -1"),
        ({"train.eval_every": 0}, "train.eval_every must be positive, got 0"),
    ],
)
def test_bad_fields_are_refused_before_any_data_is_read(tmp_path, monkeypatch, overrides, message):
    def read(*args, **kwargs):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(pipeline, "open_corpus", read)
    with pytest.raises(UserError, match=message):
        train.train_and_evaluate(tiny_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()
