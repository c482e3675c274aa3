"""Log-probabilities of a whole text under a model, in sliding windows of its context.

Each window of `context` tokens scores only its last `stride` positions (the first window
scores all of its own), so every token after the first `context` sees at least
`context - stride` tokens of history; `stride = context` gives back-to-back windows, where
the first tokens of each window see almost none. Windows run `batch_size` at a time through
one jitted function (compiled once per model structure and (rows, context) shape).

    score = score_tokens(model, tokens, context)
    score.log_probs       # nats of tokens[1:], each given the ones before it
    score.bits_per_char   # the summary (with `chars_per_token` for a subword tokenizer)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from charlm_jax.errors import UserError

BATCH_SIZE = 32  # windows per call


def default_stride(context: int) -> int:
    """The stride when none is given: each scored token sees at least half the context."""
    return max(1, context // 2)


@dataclasses.dataclass(frozen=True)
class TextScore:
    """A text's scores: log_probs[i] is log p(tokens[i + 1] | tokens[: i + 1]) in nats (the
    first token has none); with top_k, each position's k likeliest tokens and their
    log-probabilities, likeliest first."""

    log_probs: np.ndarray  # (len(tokens) - 1,) float32
    chars_per_token: float = 1.0
    top_ids: np.ndarray | None = None  # (len(tokens) - 1, top_k) int32
    top_log_probs: np.ndarray | None = None  # (len(tokens) - 1, top_k) float32

    @property
    def nats_per_token(self) -> float:
        """Mean negative log-probability per scored token (nan for none)."""
        if not len(self.log_probs):
            return math.nan
        return -float(np.sum(self.log_probs, dtype=np.float64)) / len(self.log_probs)

    @property
    def bits_per_char(self) -> float:
        """The headline unit: bits per character of text, comparable across tokenizers."""
        return self.nats_per_token / math.log(2) / self.chars_per_token


def window_starts(num_tokens: int, context: int, stride: int) -> np.ndarray:
    """The first token of each window over a text of `num_tokens` tokens: 0, then every
    `stride` tokens until a window reaches the last token."""
    targets = num_tokens - 1
    count = 1 + max(0, -(-(targets - context) // stride))
    return np.arange(count) * stride


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _window_log_probs(graphdef, state, inputs, targets, top_k: int):
    """Log-probabilities of `targets` after each prefix of `inputs` (rows, context), and the
    top_k alternatives (None for 0)."""
    logits = nnx.merge(graphdef, state)(inputs).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if not top_k:
        return chosen, None
    top_logp, top_ids = jax.lax.top_k(logp, top_k)
    return chosen, (top_ids, top_logp)


def score_tokens(
    model: nnx.Module,
    tokens: np.ndarray,
    context: int,
    stride: int | None = None,
    *,
    batch_size: int = BATCH_SIZE,
    top_k: int = 0,
    chars_per_token: float = 1.0,
) -> TextScore:
    """Scores every token of `tokens` after the first under `model`, in sliding windows of
    `context` tokens moved by `stride` (default `default_stride(context)`; `context`:
    back-to-back windows). `chars_per_token` converts the summary to bits per character."""
    [score] = score_texts(model, [tokens], context, stride, batch_size=batch_size, top_k=top_k)
    return dataclasses.replace(score, chars_per_token=chars_per_token)


def score_texts(
    model: nnx.Module,
    texts: Sequence[np.ndarray],
    context: int,
    stride: int | None = None,
    *,
    batch_size: int = BATCH_SIZE,
    top_k: int = 0,
) -> list[TextScore]:
    """`score_tokens` of each of `texts` (token ids), their windows batched together: many
    short texts take one call per `batch_size` windows, not one each."""
    stride = default_stride(context) if stride is None else stride
    if not 1 <= stride <= context:
        raise UserError(f"stride must be in [1, {context}] (the context), got {stride}")
    if batch_size < 1 or top_k < 0:
        raise UserError(f"batch_size must be >= 1 and top_k >= 0, got {batch_size}, {top_k}")
    if not texts:
        return []
    # The texts back to back, each followed by padding that its last window may read.
    padding = np.zeros(context + stride, np.int32)
    flat = np.concatenate([part for t in texts for part in (np.asarray(t, np.int32), padding)])
    bases = np.cumsum([0] + [len(t) + len(padding) for t in texts[:-1]])
    starts = [window_starts(len(t), context, stride) for t in texts]
    windows = np.concatenate([base + s for base, s in zip(bases, starts, strict=True)])
    rows = min(batch_size, 1 << (len(windows) - 1).bit_length())  # few shapes for short texts
    windows = np.pad(windows, (0, -len(windows) % rows), constant_values=len(flat) - context - 1)
    graphdef, state = nnx.split(model)
    offsets = np.arange(context + 1)
    outputs = []
    for i in range(0, len(windows), rows):
        batch = flat[windows[i : i + rows, None] + offsets]
        outputs.append(_window_log_probs(graphdef, state, batch[:, :-1], batch[:, 1:], top_k))
    chosen = np.concatenate([np.asarray(c) for c, _ in outputs])
    tops = [
        np.concatenate([np.asarray(top[j]) for _, top in outputs]) if top_k else None
        for j in (0, 1)
    ]
    scores, end = [], 0
    for text, text_starts in zip(texts, starts, strict=True):
        keep = _scored_positions(text_starts, len(text), context, stride)
        window = slice(end, end + len(text_starts))
        end = window.stop
        kept = [None if x is None else x[window][keep] for x in tops]
        scores.append(TextScore(chosen[window][keep], 1.0, *kept))
    return scores


def _scored_positions(starts: np.ndarray, num_tokens: int, context: int, stride: int):
    """Which positions of each window are scored (windows, context): all of the first
    window's, the last `stride` of the others', none past the text's end."""
    offsets = np.arange(context)
    first = np.where(starts == 0, 0, context - stride)
    return (offsets >= first[:, None]) & (starts[:, None] + offsets + 1 < num_tokens)
