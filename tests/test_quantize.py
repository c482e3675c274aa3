"""int8 quantization: accuracy against float32, real int8 dots, export and load, bad input."""

import re
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from test_cli import assert_one_line_error, main_in_process

from charlm_jax.decoding import engine
from charlm_jax.decoding.sampling import Sampler
from charlm_jax.model import int8, models
from charlm_jax.training import train
from charlm_jax.workdir import checkpoints, loader
from charlm_jax.workdir.int8_export import export_int8
from charlm_jax.workdir.loader import open_run

VOCAB = 20
CONTEXT = 32  # tiny_config's context length
VARIANTS = [
    ("transformer", {}),
    ("transformer", {"model.position": "rope", "model.norm": "rmsnorm", "model.use_bias": True}),
    ("mlp", {}),
]


def random_model(name="transformer", **overrides) -> nnx.Module:
    config = tiny_config(name, **overrides)
    return models.create_model(config, VOCAB, nnx.Rngs(3))


def tokens(batch=3, time=32, seed=0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, time), 0, VOCAB)


@pytest.mark.parametrize(("name", "overrides"), VARIANTS)
def test_int8_logits_are_close_to_float32(name, overrides):
    model = random_model(name, **overrides)
    quantized = int8.quantize_model(model)
    ids = tokens()
    want, got = np.asarray(model(ids)), np.asarray(quantized(ids))
    spread = want.std()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert np.abs(got - want).mean() < 0.02 * spread
    # The float model is untouched, and quantizing is not a no-op.
    np.testing.assert_array_equal(np.asarray(model(ids)), want)
    assert np.abs(got - want).max() > 0


@pytest.mark.parametrize(("name", "overrides"), VARIANTS[::2])
def test_cached_decoding_of_the_int8_model_matches_its_full_forward(name, overrides):
    quantized = int8.quantize_model(random_model(name, **overrides))
    ids = tokens(batch=2, time=32)
    logits, _ = engine.prefill(quantized, ids, jnp.full(2, 32), 32)
    np.testing.assert_allclose(logits, quantized(ids)[:, -1], atol=1e-5)


def int8_dot_count(model: nnx.Module, ids: jax.Array) -> int:
    """The s8 x s8 -> s32 dots in the compiled forward pass."""
    graphdef, state = nnx.split(model)
    hlo = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, ids).compile().as_text()
    return int8_dots(hlo)


def int8_dots(hlo: str) -> int:
    """The s8 x s8 -> s32 dots in compiled HLO text: XLA prints each dot inside its own
    computation, whose parameters carry the operand types."""
    count = 0
    for computation in hlo.split("\n\n"):
        dots = re.findall(r"= s32\[[\d,]*\]\S* dot\(%(\S+), %(\S+)\)", computation)
        for lhs, rhs in dots:
            types = [re.search(rf"%{re.escape(x)} = (\w+)\[", computation) for x in (lhs, rhs)]
            count += all(t and t.group(1) == "s8" for t in types)
    return count


@pytest.mark.parametrize("batch", [1, 4])
def test_compiled_forward_runs_int8_dots(batch):
    quantized = int8.quantize_model(random_model())
    ids = tokens(batch=batch, time=1)
    # 2 blocks x (qkv, out, up, down) + the tied head.
    assert int8_dot_count(quantized, ids) == 9
    assert int8_dot_count(random_model(), ids) == 0


@pytest.mark.parametrize(("name", "overrides"), VARIANTS[::2])
def test_small_engines_decode_with_the_dequantized_float_copy(name, overrides):
    """Below MIN_ROWS slots an engine not warmed up decodes with a float32 model (no int8
    dot) holding the int8 weights times their scales: its logits are the int8 model's up to
    activation rounding."""
    model = random_model(name, **overrides)
    quantized = int8.quantize_model(model)
    ids = tokens(batch=1, time=1)

    def decoded_model(model, slots):
        eng = engine.Engine(model, CONTEXT, num_slots=slots)
        return eng.int8_dots, nnx.merge(eng.graphdef, eng.weights)

    dots, large = decoded_model(quantized, int8.MIN_ROWS)
    assert dots and int8.is_quantized(large)
    dots, plain = decoded_model(model, 1)
    assert not dots and not int8.is_quantized(plain)
    dots, small = decoded_model(quantized, int8.MIN_ROWS - 1)
    assert not dots
    assert not int8.is_quantized(small) and int8_dot_count(small, ids) == 0
    if name == "transformer":  # the lookup table is the float32 original
        np.testing.assert_array_equal(small.embed.embedding[...], model.embed.embedding[...])
    ids = tokens()
    want, got = np.asarray(quantized(ids)), np.asarray(small(ids))
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert int8.is_quantized(quantized)  # the quantized model is untouched


def test_rows_are_quantized_independently_of_their_batch():
    """Fewer rows than MIN_ROWS are padded; each row's result is the same in any batch."""
    linear = nnx.Linear(16, 24, rngs=nnx.Rngs(0))
    layer = int8.Int8Linear(linear)
    x = jax.random.normal(jax.random.key(1), (int8.MIN_ROWS + 3, 16))
    whole = np.asarray(layer(x))
    for n in (1, 2, int8.MIN_ROWS):
        np.testing.assert_array_equal(np.asarray(layer(x[:n])), whole[:n])
    np.testing.assert_allclose(whole, linear(x), atol=0.03 * np.abs(linear(x)).max())


def test_zero_rows_and_columns_stay_zero():
    q, scale = int8.quantize_array(jnp.zeros((3, 4)).at[0, 1].set(2.0), axis=1)
    np.testing.assert_array_equal(q[0], [0, 127, 0, 0])
    np.testing.assert_array_equal(q[1:], 0)
    np.testing.assert_allclose(scale[:, 0], [2.0 / 127, 1.0, 1.0], rtol=1e-6)


def train_tiny_run(tmp: Path) -> Path:
    """A tiny Transformer trained 4 steps in tmp/run."""
    text = tmp / "text.txt"
    text.write_text("ROMEO: to be or not to be\nJULIET: that is the question\n" * 50)
    config = tiny_config(**{"data.path": str(text), "train.num_steps": 4, "train.eval_every": 4})
    train.train_and_evaluate(config, tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("quant"))


def test_export_is_smaller_and_loads_as_it_was_quantized(workdir, tmp_path):
    float_run = open_run(workdir)
    loaded_int8 = open_run(workdir, quantize="int8").model
    path = export_int8(workdir, tmp_path / "int8")
    exported = open_run(tmp_path / "int8", quantize="int8")
    assert exported.tokenizer.chars == float_run.tokenizer.chars
    assert exported.step == float_run.step and path.name == str(float_run.step)
    ids = jnp.asarray(float_run.tokenizer.encode("ROMEO: to be or not")[None])
    np.testing.assert_array_equal(exported.model(ids), loaded_int8(ids))
    assert not np.array_equal(exported.model(ids), float_run.model(ids))

    def disk(p):
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    def nbytes(model):
        return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))

    # Tiny models: float embeddings and scales weigh more, and so does orbax's metadata,
    # whose size varies from save to save (the export measured 0.62-0.74 of the float
    # checkpoint; a float32 export would be about 1.0).
    assert nbytes(exported.model) < 0.4 * nbytes(float_run.model)
    original = workdir / checkpoints.CHECKPOINT_DIR / str(float_run.step) / "model"
    assert disk(path / "model") < 0.85 * disk(original)


def test_bad_input(workdir, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization mode 'int4'"):
        open_run(workdir, quantize="int4")
    with pytest.raises(ValueError, match="unknown quantization mode 'fp8'"):
        int8.quantize_model(random_model(), "fp8")
    with pytest.raises(ValueError, match="already quantized"):
        int8.quantize_model(int8.quantize_model(random_model()))
    with pytest.raises(ValueError, match="no checkpoints in"):
        open_run(tmp_path / "nothing", quantize="int8")
    export_int8(workdir, tmp_path / "int8")
    with pytest.raises(ValueError, match="holds an int8-quantized checkpoint: load it with"):
        open_run(tmp_path / "int8")
    with pytest.raises(ValueError, match="already quantized"):
        export_int8(tmp_path / "int8", tmp_path / "again")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        export_int8(workdir, tmp_path / "int8")


def test_export_and_generate_clis(workdir, tmp_path, capfd):
    def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
        return main_in_process(capfd, module, *args)

    out = tmp_path / "q"
    result = run_module("charlm_jax.quantize", f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    run = open_run(workdir, quantize="int8")
    assert result.stdout == f"int8 checkpoint written to {out / 'checkpoints' / str(run.step)}\n"
    assert loader.saved_quantization(out) == "int8"
    exported = open_run(out, quantize="int8")  # the int8 model of the best checkpoint
    ids = jnp.asarray(run.tokenizer.encode("ROMEO: to be")[None])
    np.testing.assert_array_equal(exported.model(ids), run.model(ids))
    generate = ["charlm_jax.generate", "--prompt=ROMEO:", "--max_new_tokens=5", "--temperature=0"]
    result = run_module(*generate, f"--workdir={out}", "--quantize=int8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:")
    want = Sampler.from_workdir(out, quantize="int8").generate(["ROMEO:"], 5, temperature=0)
    assert result.stdout.rstrip("\n") == "ROMEO:" + want[0]
    assert_one_line_error(run_module(*generate, f"--workdir={out}"), "load it with quantize='int8'")
    assert_one_line_error(
        run_module(*generate, f"--workdir={workdir}", "--quantize=int4"),
        "error: unknown quantization mode 'int4'",
    )
    assert_one_line_error(
        run_module("charlm_jax.quantize", f"--workdir={tmp_path / 'none'}", f"--out={out}2"),
        "error: no checkpoints in",
    )
