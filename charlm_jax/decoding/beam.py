"""Beam search on the decode engine's model, cache and context policy.

The beams are the rows of a cache (as in flax's examples/wmt/decode.py): at each step every
beam's next-token log-probabilities extend its score, the `beam_size` best (beam, token) pairs
survive, and the rows (cache, logits, window, tokens so far) are gathered from their parents
before the chosen tokens are appended. Prefill, append and the rebuild of a full window from
its newest half are the engine's own (`engine.prefill`, `engine.append`, `engine.newest_half`),
so a beam of one is the engine's greedy decoding. All beams share one length, so the host
knows when the window fills: cached steps run in one jitted loop up to there, then one step
rebuilds every row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from charlm_jax.decoding import engine
from charlm_jax.errors import UserError

MIN_OUTPUT_BUCKET = 64  # output buffers are sized to powers of two from here: few compilations


class BeamState(NamedTuple):
    cache: object  # the model's cache pytree, one row per beam
    logits: jax.Array  # (beams, vocab) float32 logits of each beam's next token
    window: jax.Array  # (beams, context_length) the text in each beam's cache
    scores: jax.Array  # (beams,) total log-probability of each beam's continuation
    tokens: jax.Array  # (beams, output bucket) each beam's continuation so far


def search(
    decoder: engine.Engine, prompt: np.ndarray, beam_size: int, max_new_tokens: int
) -> tuple[np.ndarray, float]:
    """The continuation (max_new_tokens,) of `prompt` (token ids) with the highest total
    log-probability found by a beam of `beam_size`, and that log-probability, decoded with
    the model and context length of `decoder`."""
    engine.check_prompt(np.asarray(prompt), decoder.vocab_size)
    engine.check_sampling_args(0.0, 0, 1.0, max_new_tokens)
    if beam_size < 1:
        raise UserError(f"beam_size must be >= 1, got {beam_size}")
    context_length = decoder.context_length
    static = (decoder.graphdef, context_length)
    window = np.asarray(prompt, np.int32)[-context_length:]
    length = len(window)
    width = next(b for b in engine.prefill_buckets(context_length) if b >= length)
    padded = np.zeros((1, width), np.int32)
    padded[0, :length] = window
    out_len = max(MIN_OUTPUT_BUCKET, 1 << max(max_new_tokens - 1, 0).bit_length())
    s = _start(*static, decoder.weights, padded, length, beam_size, out_len)
    step = 0
    while step < max_new_tokens:
        end = min(max_new_tokens, step + context_length - length)  # the window's room
        if end > step:
            s = _extend(*static, decoder.weights, s, step, end, length)
            length, step = length + end - step, end
        if step < max_new_tokens:  # the window is full: rebuild it with the next token
            s = _rebuild(*static, decoder.weights, s, step)
            length, step = engine.rebuilt_length(context_length), step + 1
    best = int(jnp.argmax(s.scores))
    return np.asarray(s.tokens[best, :max_new_tokens]), float(s.scores[best])


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def _start(graphdef, context_length, weights, tokens, length, beams: int, out_len: int):
    """The beams for a prompt window `tokens` (1, width), `length` long: copies of it, of
    which only the first may expand at the first step."""
    logits, cache = engine.prefill(
        nnx.merge(graphdef, weights), tokens, jnp.reshape(length, (1,)), context_length
    )
    window = jnp.zeros((1, context_length), jnp.int32).at[:, : tokens.shape[1]].set(tokens)
    copies = lambda x: jnp.repeat(x, beams, axis=0)  # noqa: E731
    return BeamState(
        jax.tree.map(copies, cache),
        copies(logits),
        copies(window),
        jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf),
        jnp.zeros((beams, out_len), jnp.int32),
    )


def _choose(s: BeamState, step) -> tuple[BeamState, jax.Array]:
    """The best `beams` extensions: their scores, the rows gathered from their parents
    (logits excepted: the caller replaces them) with the chosen token recorded at `step`;
    and those tokens (beams,)."""
    beams, vocab = s.logits.shape
    logp = jax.nn.log_softmax(s.logits)
    scores, flat = jax.lax.top_k((s.scores[:, None] + logp).reshape(-1), beams)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    cache, window, tokens = jax.tree.map(lambda x: x[parent], (s.cache, s.window, s.tokens))
    return BeamState(cache, s.logits, window, scores, tokens.at[:, step].set(token)), token


@functools.partial(
    jax.jit, static_argnums=(0, 1), donate_argnums=3, compiler_options=engine.COMPILER_OPTIONS
)
def _extend(graphdef, context_length, weights, s: BeamState, start, end, length) -> BeamState:
    """Steps start..end-1, each appending one token per beam to windows `length` long at
    `start` (the window never fills here)."""
    model = nnx.merge(graphdef, weights)

    def step(i, s):
        s, token = _choose(s, i)
        at = length + i - start
        lengths = jnp.full(token.shape, at)
        logits, cache = engine.append(model, s.cache, token, lengths, context_length)
        window = s.window.at[:, at].set(token)
        return s._replace(cache=cache, logits=logits, window=window)

    return jax.lax.fori_loop(start, end, step, s)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _rebuild(graphdef, context_length, weights, s: BeamState, step) -> BeamState:
    """Step `step` on full windows: each beam keeps the newest half of its window plus its
    new token, prefilled into a new cache."""
    s, token = _choose(s, step)
    kept = engine.newest_half(jnp.concatenate([s.window, token[:, None]], 1), context_length)
    beams, width = kept.shape
    logits, cache = engine.prefill(
        nnx.merge(graphdef, weights), kept, jnp.full(beams, width), context_length
    )
    window = jnp.zeros_like(s.window).at[:, :width].set(kept)
    return s._replace(cache=cache, logits=logits, window=window)
