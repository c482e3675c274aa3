"""Structured pruning: the kept neurons compute what they did, the workdir loads and trains."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from test_cli import assert_one_line_error
from test_quantize import run_module, train_tiny_run

from charlm_jax import prune, quantize
from charlm_jax.decoding.sampling import Sampler
from charlm_jax.model import models
from charlm_jax.workdir import checkpoints

VOCAB = 20


@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_pruned_model_equals_the_original_with_the_dropped_neurons_silenced(name):
    config = tiny_config(name)
    model = models.create_model(config, VOCAB, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (4, 32), 0, VOCAB)
    scores = prune.neuron_scores(model, [np.asarray(ids)])
    small, small_config = prune.prune_model(model, config, VOCAB, scores, 16)
    assert small_config.model.hidden_dim == 16 and config.model.hidden_dim != 16
    silenced = nnx.clone(model)
    for (_, reader), score in zip(prune.layer_pairs(silenced), scores, strict=True):
        dropped = np.argsort(-score, kind="stable")[16:]
        layer = prune._child(*reader)
        layer.kernel[...] = layer.kernel[...].at[dropped].set(0)
    np.testing.assert_allclose(small(ids), silenced(ids), atol=1e-5)
    assert models.count_params(small) < models.count_params(model)


def test_a_neuron_that_sends_nothing_goes_first():
    config = tiny_config()
    model = models.create_model(config, VOCAB, nnx.Rngs(0))
    down = model.blocks[0].mlp.down
    down.kernel[...] = down.kernel[...].at[5].set(0)
    ids = np.asarray(jax.random.randint(jax.random.key(1), (2, 32), 0, VOCAB))
    scores = prune.neuron_scores(model, [ids])
    assert scores[0][5] == 0 and np.argmin(scores[0]) == 5
    assert (scores[1] > 0).all()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("prune"))


def test_pruned_workdir_loads_samples_quantizes_and_fine_tunes(workdir, tmp_path):
    result = prune.prune_workdir(workdir, tmp_path / "p", 0.5)
    model, _, config = checkpoints.load_model(tmp_path / "p")
    assert config.model.hidden_dim == result["hidden_dim"] == 32
    assert model.blocks[0].mlp.up.kernel.shape == (32, 32)
    assert Sampler.from_workdir(tmp_path / "p", quantize="int8").generate(["RO"], 4)[0]
    tuned = prune.prune_workdir(workdir, tmp_path / "t", 0.25, finetune_steps=3)
    assert tuned["finetune"]["steps"] == 3 and tuned["hidden_dim"] == 16
    assert checkpoints.load_model(tmp_path / "t", "latest")[2].model.hidden_dim == 16


def test_bad_input(workdir, tmp_path):
    for keep in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"mlp_keep must be in \(0, 1\], got {keep}"):
            prune.prune_workdir(workdir, tmp_path / "x", keep)
    with pytest.raises(ValueError, match="no checkpoints in"):
        prune.prune_workdir(tmp_path / "nothing", tmp_path / "x", 0.5)
    quantize.export(workdir, tmp_path / "q")
    with pytest.raises(ValueError, match="holds a quantized checkpoint"):
        prune.prune_workdir(tmp_path / "q", tmp_path / "x", 0.5)
    args = [f"--workdir={workdir}", f"--out={tmp_path / 'y'}", "--mlp_keep=2"]
    assert_one_line_error(
        run_module("charlm_jax.prune", *args), "error: mlp_keep must be in (0, 1], got 2.0"
    )
