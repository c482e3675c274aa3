"""The text scorer: sliding windows equal a naive recomputation of each position, for any
stride and batch size; the summary in bits per character; bad strides."""

import math

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from charlm_jax.errors import UserError
from charlm_jax.model import models, scoring

VOCAB = 20
CONTEXT = 8


@pytest.fixture(scope="module", params=["transformer", "mlp"])
def model(request):
    config = tiny_config(request.param, **{"data.context_length": CONTEXT})
    return models.create_model(config, VOCAB, nnx.Rngs(5))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, 40).astype(np.int32)


def jitted_forward(model):
    """model(tokens), compiled once per length (eager calls compile every operation)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda ids: forward(state, ids)


def naive_scores(model, tokens, context, stride):
    """Each token j >= 1 scored by a full forward over its own window: tokens[b:j], where b
    is 0 while j fits the first window, else the first multiple of `stride` whose window of
    `context` tokens reaches j."""
    forward = jitted_forward(model)
    rows = []
    for j in range(1, len(tokens)):
        b = 0 if j <= context else math.ceil((j - context) / stride) * stride
        assert j - b >= min(j, context - stride + 1)  # the history the protocol promises
        rows.append(np.asarray(jax.nn.log_softmax(forward(tokens[None, b:j])[0, -1])))
    return np.stack(rows)


@pytest.mark.parametrize("stride", [CONTEXT, 3, 1])
def test_sliding_windows_equal_a_naive_recomputation(model, tokens, stride):
    rows = naive_scores(model, tokens, CONTEXT, stride)
    score = scoring.score_tokens(model, tokens, CONTEXT, stride, top_k=3)
    assert score.log_probs.shape == (len(tokens) - 1,)
    np.testing.assert_allclose(score.log_probs, rows[np.arange(len(rows)), tokens[1:]], atol=1e-5)
    top = np.argsort(-rows, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(score.top_ids, top)
    np.testing.assert_allclose(
        score.top_log_probs, np.sort(rows, axis=1)[:, ::-1][:, :3], atol=1e-5
    )


def test_a_stride_of_the_context_scores_back_to_back_windows():
    """The speedrun's and the PyTorch peer's protocol: windows of the context, one after the
    other, each scoring all its positions."""
    model = models.create_model(tiny_config(), 65, nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 65, 300).astype(np.int32)
    forward = jitted_forward(model)
    expected = []  # window by window
    for start in range(0, len(tokens) - 1, 32):
        window = tokens[start : start + 33]
        logits = forward(window[None, :-1])[0]
        expected += list(-jax.nn.log_softmax(logits)[np.arange(len(window) - 1), window[1:]])
    got = scoring.score_tokens(model, tokens, 32, stride=32, batch_size=3).nats_per_token
    np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)


def test_scores_do_not_depend_on_the_batch_size(model, tokens):
    whole = scoring.score_tokens(model, tokens, CONTEXT, 4).log_probs
    for batch_size in (1, 3):
        got = scoring.score_tokens(model, tokens, CONTEXT, 4, batch_size=batch_size).log_probs
        np.testing.assert_allclose(got, whole, atol=1e-6)


def test_summary_is_bits_per_character(model, tokens):
    score = scoring.score_tokens(model, tokens, CONTEXT, chars_per_token=2.0)
    nats = -float(np.mean(score.log_probs))
    assert score.nats_per_token == pytest.approx(nats, rel=1e-6)
    assert score.bits_per_char == pytest.approx(nats / math.log(2) / 2.0, rel=1e-6)
    empty = scoring.score_tokens(model, tokens[:1], CONTEXT)
    assert empty.log_probs.shape == (0,) and math.isnan(empty.bits_per_char)


@pytest.mark.parametrize("stride", [0, -1, CONTEXT + 1])
def test_bad_stride(model, tokens, stride):
    with pytest.raises(UserError, match=rf"stride must be in \[1, {CONTEXT}\].*got {stride}"):
        scoring.score_tokens(model, tokens, CONTEXT, stride)


def test_several_texts_score_as_each_alone(model, tokens):
    texts = [tokens, tokens[:1], tokens[:0], tokens[5:19], tokens[::-1]]
    together = scoring.score_texts(model, texts, CONTEXT, 3, batch_size=4, top_k=2)
    for text, score in zip(texts, together, strict=True):
        alone = scoring.score_tokens(model, text, CONTEXT, 3, top_k=2)
        assert score.log_probs.shape == (max(0, len(text) - 1),)
        np.testing.assert_allclose(score.log_probs, alone.log_probs, atol=1e-6)
        np.testing.assert_array_equal(score.top_ids, alone.top_ids)
