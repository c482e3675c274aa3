"""experiments/speedrun.py: a tiny model reaches a loose target, and bad input (a
non-positive target, a budget spent before the target). Its whole-text score is the scorer's
with stride = context (tests/test_scoring.py)."""

import dataclasses
import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_MODEL, tiny_config
from flax import nnx
from test_cli import main_in_process

from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.training import optimizers, train

sys.path.insert(0, str(ROOT / "experiments"))  # speedrun.py imports its sibling modules
import provenance  # noqa: E402

TINY = [f"--set={k}={v}" for k, v in TINY_MODEL["transformer"].items()] + [
    "--set=data.context_length=32",
    "--set=train.batch_size=8",
    "--set=train.learning_rate=3e-3",
    "--set=train.warmup_steps=5",
]


@pytest.fixture(scope="module")
def speedrun():
    spec = importlib.util.spec_from_file_location("speedrun", ROOT / "experiments/speedrun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_speedrun(capfd, *args: str) -> subprocess.CompletedProcess:
    """`python experiments/speedrun.py args`, in this process (each seed is a process of its
    own either way)."""
    return main_in_process(capfd, str(ROOT / "experiments" / "speedrun.py"), *args)


@pytest.mark.parametrize("reference", ["nanogpt_baby", "nanogpt"])
def test_tiny_model_reaches_a_loose_target(speedrun, reference):
    config = tiny_config(**{"train.num_steps": 200, "train.optimizer": "muon",
                            "train.schedule": "wsd", "train.muon_learning_rate": 0.05})  # fmt: skip
    # The GPU variant's settings, on the CPU: bfloat16 matmuls.
    if reference == "nanogpt":
        config.model.dtype = "bfloat16"
    # The reference's estimate at a tiny scale (nanogpt's is 200 batches of 64 windows).
    ref = dataclasses.replace(
        speedrun.REFERENCES[reference], estimate_batches=4, estimate_batch_size=8
    )
    record, model = speedrun.train_to_target(config, ref, 3.0, 10, 200, 0, 0.1)
    whole = speedrun.whole_val_loss(model, config)
    assert record["reached"] and record["estimate"] <= 3.0 < whole + 0.3
    assert 10 <= record["steps"] < 200 and record["steps"] % 10 == 0
    assert 0 < record["startup_s"] < record["wall_to_target_s"]


@pytest.mark.parametrize("target", ["0", "-1", "nan"])
def test_non_positive_target_is_one_line(target, capfd):
    result = run_speedrun(capfd, f"--target={target}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: --target must be a positive number, got {float(target)}"
    ]


def test_budget_spent_before_target_says_how_far_it_got(tmp_path, capfd):
    # Two seeds: each runs in its own process, and the first failure stops the run.
    out = tmp_path / "run.json"
    result = run_speedrun(capfd, *TINY, "--seeds=0,1", "--target=0.5", "--max_steps=4",
                          "--check_every=2", f"--out={out}")  # fmt: skip
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode != 0 and line.startswith("error: seed 0: target 0.5 not reached: ")
    assert " at step 4 in " in line and "whole val text" in line
    record = json.loads(out.read_text())  # what was done is kept
    assert [(r["seed"], r["reached"]) for r in record["runs"]] == [(0, False)]
    # The parent times each seed's whole process, which outlasts the seed's own clock.
    assert record["runs"][0]["process_s"] > record["runs"][0]["wall_to_target_s"]


def test_record_file(tmp_path, capfd):
    out = tmp_path / "run.json"
    result = run_speedrun(
        capfd, *TINY, "--seeds=3", "--target=3.9", "--check_every=2", f"--out={out}"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["target"] == 3.9 and [r["seed"] for r in record["runs"]] == [3]
    assert record["runs"][0]["reached"] and record["mean"]["steps"] == record["runs"][0]["steps"]
    assert "seed 3: reached 3.9 at step" in result.stdout
    assert provenance.missing(record) == []
    assert record["provenance"]["command"] == (
        f"python experiments/speedrun.py {' '.join(TINY)} --seeds=3 --target=3.9 "
        f"--check_every=2 --out={out}"
    )


def test_wsd_schedule_holds_then_decays():
    config = tiny_config(**{"train.schedule": "wsd", "train.num_steps": 100,
                            "train.warmup_steps": 10, "train.decay_fraction": 0.2})  # fmt: skip
    lr = optimizers.schedule(config.train, 1.0, 0.1)
    assert float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == float(lr(79)) == 1.0
    assert float(lr(90)) == pytest.approx(0.55) and float(lr(100)) == pytest.approx(0.1)


def test_muon_updates_only_the_blocks_matrices_orthogonally():
    config = tiny_config(
        **{"train.optimizer": "muon", "train.weight_decay": 0.0, "train.warmup_steps": 0}
    )
    model = models.create_model(config, 65, nnx.Rngs(0))
    tx, _ = train.create_optimizer(config.train)
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    updates, _ = tx.update(grads, tx.init(params), params, lr_factor=jnp.float32(1.0))
    up = updates["blocks"][0]["mlp"]["up"]["kernel"][...]  # (32, 64): rows orthonormal-ish
    singular = np.linalg.svd(np.asarray(up), compute_uv=False)
    assert singular.max() / singular.min() < 2  # Newton-Schulz flattens the spectrum
    # AdamW's first update is -lr * sign(grad) elementwise (up to its epsilon: the
    # gradients are clipped to norm 1).
    lr = config.train.learning_rate
    for leaf in (updates["embed"]["embedding"], updates["blocks"][0]["attn_norm"]["scale"]):
        np.testing.assert_allclose(np.abs(leaf[...]), lr, rtol=1e-2)


SPEEDRUN_MODEL = {"model.position": "rope", "model.qk_norm": True, "model.activation": "relu2",
                  "model.tie_embeddings": False, "model.logit_softcap": 5.0}  # fmt: skip


def test_speedrun_model_decodes_with_its_cache_as_it_runs_whole():
    model = models.create_model(tiny_config(**SPEEDRUN_MODEL), 65, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 65)
    full = model(tokens)
    assert float(jnp.abs(full).max()) < 5.0  # soft-capped
    cache = model.init_cache(2, 32)
    mask = jnp.tril(jnp.ones((12, 32), bool))[None].repeat(2, 0)
    positions = jnp.arange(12)[None].repeat(2, 0)
    cached, _ = model.forward_cached(tokens, positions, mask, cache, 0)
    np.testing.assert_allclose(cached, full, atol=1e-5)


def test_zero_init_starts_every_block_as_the_identity_and_predicts_uniformly():
    config = tiny_config(**{**SPEEDRUN_MODEL, "model.zero_init": True})
    model = models.create_model(config, 65, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 65)
    np.testing.assert_array_equal(model(tokens), 0.0)
    for block in model.blocks:
        assert not block.attn.out.kernel[...].any() and not block.mlp.down.kernel[...].any()


def test_dot_product_attention_matches_the_xla_attention():
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 65)
    logits = [
        models.create_model(tiny_config(**{"model.attention": kind}), 65, nnx.Rngs(0))(tokens)
        for kind in ("xla", "dot_product")
    ]
    np.testing.assert_allclose(logits[0], logits[1], atol=2e-5)


@pytest.mark.parametrize(
    "field, value", [("activation", "swish"), ("attention", "flash"), ("logit_softcap", -1.0)]
)
def test_bad_model_option_names_the_field(field, value):
    with pytest.raises(UserError, match=f"model.{field}"):
        models.create_model(tiny_config(**{f"model.{field}": value}), 65, nnx.Rngs(0))


def test_a_seeds_saved_weights_load_as_the_same_model(speedrun, tmp_path):
    # A seed's process saves its model; the parent loads it to score the whole text.
    config = tiny_config(**{"model.position": "rope", "model.bigram_embedding": True})
    model = models.create_model(config, 65, nnx.Rngs(0))  # tiny Shakespeare's 65 characters
    state = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(1), x.shape),
                         nnx.state(model))  # fmt: skip
    nnx.update(model, state)
    speedrun.save_weights(model, tmp_path / "w.npz")
    loaded = speedrun.load_weights(config, tmp_path / "w.npz")
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 65)
    np.testing.assert_array_equal(loaded(tokens), model(tokens))
