"""The Hugging Face export: transformers loads it and computes the JAX model's logits."""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config
from flax import nnx
from test_cli import main_in_process

from charlm_jax.data.text_files import embedded_tiny_shakespeare
from charlm_jax.data.tokenizers import CharTokenizer
from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.workdir import checkpoints, hf_export

TEXT = embedded_tiny_shakespeare().read_text(encoding="utf-8")[:20_000]
VAL_TEXT = TEXT[-int(len(TEXT) * 0.1) :]  # the run's validation split
CONTINUATION = 24  # greedy tokens compared


def _workdir(path, seed: int = 0, **overrides):
    """A workdir whose checkpoint (step 0) holds a randomly initialised tiny model, each
    parameter (biases and norm scales too) shifted by noise so that every one matters."""
    config = tiny_config(**overrides)
    tokenizer = CharTokenizer.from_text(TEXT)
    model = models.create_model(config, tokenizer.vocab_size, nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    path.mkdir()
    checkpoints.save_run_files(path, config, tokenizer)
    with checkpoints.open_manager(path) as manager:
        state = ocp.args.StandardSave(nnx.state(model))
        manager.save(0, args=ocp.args.Composite(model=state), metrics={checkpoints.METRIC: 1.0})
    return path, model, tokenizer


@nnx.jit
def _forward(model, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def _greedy(model, ids: np.ndarray, steps: int) -> list[int]:
    # One compiled shape (the whole context, zero-padded): the model is causal, so the
    # padding never reaches the positions read; eager calls would compile every length.
    tokens = np.zeros((1, model.cfg.context_length), np.int32)
    tokens[0, : ids.size] = ids
    for end in range(ids.size, ids.size + steps):
        tokens[0, end] = int(jnp.argmax(_forward(model, jnp.asarray(tokens))[0, end - 1]))
    return tokens[0, ids.size : ids.size + steps].tolist()


ARCHITECTURES = {
    "gpt2": {},
    "gpt2-bias-own-head-relu2": {
        "model.use_bias": True,
        "model.tie_embeddings": False,
        "model.activation": "relu2",
    },
    "gpt_neox": {"model.position": "rope", "model.use_bias": True},
    "arcee": {"model.position": "rope", "model.norm": "rmsnorm", "model.use_bias": True},
    "arcee-speedrun": {
        "model.position": "rope",
        "model.norm": "rmsnorm",
        "model.activation": "relu2",
        "model.tie_embeddings": False,
    },
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_transformers_computes_the_same_logits(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    workdir, model, tokenizer = _workdir(tmp_path / "run", **ARCHITECTURES[name])
    out = hf_export.export(workdir, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_model.config.model_type == name.split("-")[0]

    ids = tokenizer.encode(VAL_TEXT[: model.cfg.context_length])
    assert hf_tokenizer(VAL_TEXT[: model.cfg.context_length])["input_ids"] == ids.tolist()
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor(ids[None], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(
        hf_logits, np.asarray(_forward(model, jnp.asarray(ids)[None])), atol=1e-4
    )

    prompt = ids[: model.cfg.context_length - CONTINUATION]
    generated = hf_model.generate(
        torch.tensor(prompt[None], dtype=torch.long),
        attention_mask=torch.ones((1, prompt.size), dtype=torch.long),
        max_new_tokens=CONTINUATION,
        do_sample=False,
    )[0, prompt.size :].tolist()
    assert generated == _greedy(model, prompt, CONTINUATION)
    assert hf_tokenizer.decode(generated) == tokenizer.decode(generated)
    spaced = tokenizer.encode("a , b . c 's ?").tolist()  # no clean-up of the spaces
    assert hf_tokenizer.decode(spaced) == "a , b . c 's ?"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.qk_norm": True}, "model.qk_norm=True"),
        ({"model.logit_softcap": 15.0}, "model.logit_softcap"),
        ({"model.bigram_embedding": True}, "model.bigram_embedding=True"),
        ({"model.norm": "rmsnorm"}, "model.norm='rmsnorm' with model.position='learned'"),
    ],
)
def test_unrepresentable_options_are_named(tmp_path, overrides, message):
    workdir, _, _ = _workdir(tmp_path / "run", **overrides)
    with pytest.raises(UserError, match=message):
        hf_export.export(workdir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_mlp_model_is_refused():
    cfg = models.model_config(tiny_config("mlp"), vocab_size=10)
    with pytest.raises(UserError, match="the MLP model"):
        hf_export.architecture(cfg)


def test_cli_errors_are_one_line(tmp_path, capfd):
    def _cli(*args: str) -> subprocess.CompletedProcess:
        return main_in_process(capfd, "charlm_jax.export", *args)

    workdir, _, _ = _workdir(tmp_path / "run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for args, message in [
        ([f"--out={tmp_path / 'full'}"], "is not an empty directory"),
        ([f"--out={tmp_path / 'hf'}", "--checkpoint=7"], "no checkpoint at step 7"),
        ([f"--out={tmp_path / 'hf'}", "--checkpoint=worst"], "checkpoint must be"),
    ]:
        result = _cli(f"--workdir={workdir}", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and message in lines[0]
    result = _cli(f"--workdir={workdir}", f"--out={tmp_path / 'hf'}")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
