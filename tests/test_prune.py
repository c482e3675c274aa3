"""Structured pruning: the kept neurons compute what they did; the pruned workdir loads,
samples, quantizes and fine-tunes; the CLI end to end; bad input."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from test_cli import assert_one_line_error, main_in_process
from test_quantize import train_tiny_run

from charlm_jax.decoding.sampling import Sampler
from charlm_jax.model import int8, models, pruning
from charlm_jax.training.prune_workdir import prune_workdir
from charlm_jax.workdir.int8_export import export_int8
from charlm_jax.workdir.loader import open_run

VOCAB = 20


@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_pruned_model_equals_the_original_with_the_dropped_neurons_silenced(name):
    config = tiny_config(name)
    model = models.create_model(config, VOCAB, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (4, 32), 0, VOCAB)
    scores = pruning.neuron_scores(model, [np.asarray(ids)])
    small, small_config = pruning.prune_model(model, config, VOCAB, scores, 16)
    assert small_config.model.hidden_dim == 16 and config.model.hidden_dim != 16
    silenced = nnx.clone(model)
    for (_, reader), score in zip(pruning.layer_pairs(silenced), scores, strict=True):
        dropped = np.argsort(-score, kind="stable")[16:]
        layer = pruning.child_layer(*reader)
        layer.kernel[...] = layer.kernel[...].at[dropped].set(0)
    np.testing.assert_allclose(small(ids), silenced(ids), atol=1e-5)
    assert models.count_params(small) < models.count_params(model)


def test_a_neuron_that_sends_nothing_goes_first():
    config = tiny_config()
    model = models.create_model(config, VOCAB, nnx.Rngs(0))
    down = model.blocks[0].mlp.down
    down.kernel[...] = down.kernel[...].at[5].set(0)
    ids = np.asarray(jax.random.randint(jax.random.key(1), (2, 32), 0, VOCAB))
    scores = pruning.neuron_scores(model, [ids])
    assert scores[0][5] == 0 and np.argmin(scores[0]) == 5
    assert (scores[1] > 0).all()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("prune"))


def greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by full forward passes."""
    for _ in range(steps):
        ids = ids + [int(np.argmax(model(np.array([ids]))[0, -1]))]
    return ids


def params(run) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(run.model, nnx.Param))]


def test_pruned_workdir_loads_samples_quantizes_and_fine_tunes(workdir, tmp_path):
    result = prune_workdir(workdir, tmp_path / "p", 0.5)
    run = open_run(tmp_path / "p")
    assert run.config.model.hidden_dim == result["hidden_dim"] == 32 and run.step == 0
    assert run.model.blocks[0].mlp.up.kernel.shape == (32, 32)
    assert result["num_params"] == models.count_params(run.model)
    assert result["num_params"] < models.count_params(open_run(workdir).model)
    sampler = Sampler.from_workdir(tmp_path / "p", quantize="int8")
    assert int8.is_quantized(sampler.model)
    (text,) = sampler.generate(["RO"], 4, temperature=0)
    # One prompt decodes on the int8 model's float32 copy (an engine below int8.MIN_ROWS).
    want = greedy(int8.dequantize_model(sampler.model), list(run.tokenizer.encode("RO")), 4)
    assert text == run.tokenizer.decode(want[2:])
    tuned = prune_workdir(workdir, tmp_path / "t", 0.25, finetune_steps=3)
    assert tuned["finetune"]["steps"] == 3 and tuned["hidden_dim"] == 16
    latest = open_run(tmp_path / "t", "latest")
    assert latest.step == 3 and latest.config.model.hidden_dim == 16
    prune_workdir(workdir, tmp_path / "u", 0.25)  # the same pruned model, not fine-tuned
    start = open_run(tmp_path / "u")
    assert any(not np.array_equal(a, b) for a, b in zip(params(start), params(latest), strict=True))


def disk(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_prune_cli_writes_a_smaller_workdir(workdir, tmp_path, capfd):
    out = tmp_path / "p"
    result = main_in_process(
        capfd, "charlm_jax.prune", f"--workdir={workdir}", f"--out={out}", "--mlp_keep=0.5"
    )
    assert result.returncode == 0, result.stderr
    pruned, original = open_run(out), open_run(workdir)
    line = f"pruned to hidden_dim 32, {models.count_params(pruned.model):,} parameters; "
    assert result.stdout.startswith(line) and "bits per character" in result.stdout
    assert models.count_params(pruned.model) < 0.8 * models.count_params(original.model)
    assert disk(out / "checkpoints" / "0" / "model") < disk(
        workdir / "checkpoints" / str(original.step) / "model"
    )


def test_bad_input(workdir, tmp_path, capfd):
    for keep in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"mlp_keep must be in \(0, 1\], got {keep}"):
            prune_workdir(workdir, tmp_path / "x", keep)
    with pytest.raises(ValueError, match="no checkpoints in"):
        prune_workdir(tmp_path / "nothing", tmp_path / "x", 0.5)
    export_int8(workdir, tmp_path / "q")
    with pytest.raises(ValueError, match="holds a quantized checkpoint"):
        prune_workdir(tmp_path / "q", tmp_path / "x", 0.5)
    with pytest.raises(ValueError, match="already holds checkpoints: choose a new one"):
        prune_workdir(workdir, tmp_path / "q", 0.5)
    args = [f"--workdir={workdir}", f"--out={tmp_path / 'y'}", "--mlp_keep=2"]
    assert_one_line_error(
        main_in_process(capfd, "charlm_jax.prune", *args),
        "error: mlp_keep must be in (0, 1], got 2.0",
    )
