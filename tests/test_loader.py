"""open_run: the checkpoint it is asked for, the step it says it loaded, int8 or float32, and
one-line errors; the documented `charlm_jax.checkpoints.load_model` on top of it."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from charlm_jax.checkpoints import load_model
from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.errors import UserError
from charlm_jax.model import int8, models
from charlm_jax.training import train
from charlm_jax.workdir import checkpoints
from charlm_jax.workdir.int8_export import export_int8
from charlm_jax.workdir.loader import open_run

VOCAB = 13
SAVED = {5: 1.0, 7: 2.0}  # step: validation loss (the best is the older one)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with two checkpoints of different random models: (its path, {step: model})."""
    workdir = tmp_path_factory.mktemp("loader")
    config = tiny_config()
    checkpoints.save_run_files(workdir, config, CharTokenizer(list("abcdefghijklm")))
    models_by_step = {}
    with checkpoints.open_manager(workdir, keep_latest=2) as manager:
        for step, val_loss in SAVED.items():
            model = models.create_model(config, VOCAB, nnx.Rngs(step))
            opt = nnx.Optimizer(model, train.create_optimizer(config.train)[0], wrt=nnx.Param)
            checkpoints.save(manager, step, nnx.state(model), nnx.state(opt), val_loss)
            models_by_step[step] = model
    return workdir, models_by_step


TOKENS = jax.random.randint(jax.random.key(0), (2, 32), 0, VOCAB)


@pytest.mark.parametrize(("checkpoint", "step"), [("best", 5), ("latest", 7), (7, 7), ("5", 5)])
def test_open_run_loads_the_checkpoint_it_names_and_says_which(saved, checkpoint, step):
    workdir, models_by_step = saved
    run = open_run(workdir, checkpoint)
    assert (run.step, run.quantize, run.context_length) == (step, "none", 32)
    assert run.tokenizer.vocab_size == VOCAB and run.config.model.name == "transformer"
    np.testing.assert_array_equal(run.model(TOKENS), models_by_step[step](TOKENS))
    model, tokenizer, config = load_model(workdir, checkpoint)  # the documented wrapper
    np.testing.assert_array_equal(model(TOKENS), models_by_step[step](TOKENS))
    assert tokenizer.chars == run.tokenizer.chars and config.to_dict() == run.config.to_dict()


def test_open_run_quantizes_as_asked(saved, tmp_path):
    workdir, models_by_step = saved
    run = open_run(workdir, "latest", quantize="int8")
    assert (run.step, run.quantize) == (7, "int8") and int8.is_quantized(run.model)
    want = np.asarray(models_by_step[7](TOKENS))
    got = np.asarray(run.model(TOKENS))
    assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert not int8.is_quantized(open_run(workdir, "latest").model)
    export_int8(workdir, tmp_path / "int8", "latest")
    exported = open_run(tmp_path / "int8", quantize="int8")  # its only checkpoint: step 7
    assert (exported.step, exported.quantize) == (7, "int8")
    np.testing.assert_array_equal(exported.model(TOKENS), got)


def one_line_error(call) -> str:
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and "--" not in message  # one line, naming no flag
    return message


def test_bad_input_is_one_line(saved, tmp_path):
    workdir, _ = saved
    message = one_line_error(lambda: open_run(workdir, 8))
    assert message == "no checkpoint at step 8; saved steps: [5, 7]"
    message = one_line_error(lambda: open_run(workdir, "newest"))
    assert message == "unknown checkpoint 'newest': expected 'best', 'latest' or a step number"
    assert one_line_error(lambda: open_run(tmp_path)) == f"no checkpoints in {tmp_path}"
    message = one_line_error(lambda: open_run(workdir, quantize="int4"))
    assert message == "unknown quantization mode 'int4': expected 'none' or 'int8'"
    export_int8(workdir, tmp_path / "int8")
    message = one_line_error(lambda: open_run(tmp_path / "int8"))
    assert message.endswith("holds an int8-quantized checkpoint: load it with quantize='int8'")
    message = one_line_error(lambda: export_int8(workdir, tmp_path / "int8"))
    assert message.endswith("already holds checkpoints: choose a new one")
