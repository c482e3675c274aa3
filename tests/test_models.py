import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from charlm_jax.errors import UserError
from charlm_jax.model import models
from charlm_jax.model.models import MLP, Dropout, Transformer, create_model

VOCAB = 11

VARIANTS = [
    ("transformer", {}),
    ("transformer", {"model.position": "rope", "model.norm": "rmsnorm", "model.use_bias": True}),
    ("mlp", {}),
]


def build(name, **overrides):
    return create_model(tiny_config(name, **overrides), VOCAB, nnx.Rngs(0))


@pytest.mark.parametrize(("name", "overrides"), VARIANTS)
def test_logits_shape(name, overrides):
    model = build(name, **overrides)
    tokens = jnp.zeros((3, 32), jnp.int32)
    logits = model(tokens)
    assert logits.shape == (3, 32, VOCAB)
    assert logits.dtype == jnp.float32
    assert model(tokens[:, :5]).shape == (3, 5, VOCAB)


@pytest.mark.parametrize(("name", "overrides"), VARIANTS)
def test_causal(name, overrides):
    """Changing the token at position j never changes logits before j, and does change j."""
    model = build(name, **overrides)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, VOCAB)
    base = np.asarray(model(tokens))
    for j in (0, 7, 31):
        changed = tokens.at[:, j].set((tokens[:, j] + 1) % VOCAB)
        out = np.asarray(model(changed))
        np.testing.assert_array_equal(out[:, :j], base[:, :j])
        assert np.abs(out[:, j] - base[:, j]).max() > 1e-6


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_attention_in_query_blocks_equals_one_block(monkeypatch, position):
    model = build("transformer", **{"model.position": position})
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, VOCAB)
    whole = model(tokens)
    monkeypatch.setattr(models, "QUERY_BLOCK", 12)  # blocks of 12, 12 and 8 queries
    np.testing.assert_allclose(model(tokens), whole, atol=1e-5)


def test_factory_builds_configured_classes():
    assert isinstance(build("transformer"), Transformer)
    assert isinstance(build("mlp"), MLP)
    model = build("transformer", **{"model.num_layers": 3, "model.embedding_dim": 24})
    assert len(model.blocks) == 3 and model.embed.embedding.shape == (VOCAB, 24)
    assert all(isinstance(build(name), models.CachedDecoder) for name in ("transformer", "mlp"))


def test_count_params():
    config = tiny_config("mlp")  # 4 characters of 8 dimensions, 2 hidden layers of 32
    expected = (VOCAB + 1) * 8 + 2 * (32 * 32 + 32) + 32 * VOCAB + VOCAB
    assert models.count_params(models.abstract_model(config, VOCAB)) == expected
    model = create_model(config, VOCAB, nnx.Rngs(0))
    assert models.count_params(model) == models.count_params(nnx.state(model)) == expected


def test_mlp_sees_its_window():
    """The MLP's prediction at t depends on exactly the last `window` tokens."""
    model = build("mlp", **{"model.window": 3})
    tokens = jax.random.randint(jax.random.key(2), (1, 10), 0, VOCAB)
    base = np.asarray(model(tokens))
    out = np.asarray(model(tokens.at[:, 4].set((tokens[:, 4] + 1) % VOCAB)))
    changed = np.abs(out - base).max(axis=-1)[0] > 1e-6
    assert changed.tolist() == [False] * 4 + [True] * 3 + [False] * 3


def test_too_long_sequence_is_an_error():
    model = build("transformer")
    with pytest.raises(ValueError, match="exceeds the model's context 32"):
        model(jnp.zeros((1, 33), jnp.int32))


def test_bad_architecture_fields():
    with pytest.raises(UserError, match="not divisible"):
        build("transformer", **{"model.num_heads": 5})
    with pytest.raises(UserError, match="model.position"):
        build("transformer", **{"model.position": "sinusoid"})
    with pytest.raises(UserError, match="model.norm"):
        models.check_config(tiny_config(**{"model.norm": "batchnorm"}))
    with pytest.raises(UserError, match="model.dtype"):
        models.check_config(tiny_config("mlp", **{"model.dtype": "float77"}))
    with pytest.raises(UserError, match="model.name"):
        models.check_config(tiny_config(**{"model.name": "rnn"}))
    models.check_config(tiny_config())
    cfg = models.model_config(tiny_config(), VOCAB)
    with pytest.raises(ValueError, match="not divisible"):  # the dataclass checks itself
        dataclasses.replace(cfg, num_heads=3)


def test_dropout_masks():
    x = jnp.ones((64, 6, 32, 32))
    dropout = Dropout(0.2)
    y = dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.8) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.8)  # kept values are rescaled
    again = dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
    other = dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(y, again)
    agree = ((np.asarray(other) != 0) == kept).mean()
    assert abs(agree - (0.8**2 + 0.2**2)) < 0.01  # another key: an independent mask
    assert dropout(x, deterministic=True) is x
    with pytest.raises(ValueError, match="dropout"):
        dropout(x, deterministic=False)
