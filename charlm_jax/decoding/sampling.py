"""Sampling text from a trained model: `Sampler`, text in and text out.

Sampling runs on the decode engine (charlm_jax/decoding/engine.py): each prompt is one request in a
slot, with the engine's context policy (when a text fills the model's context, its oldest
half is dropped and the cache rebuilt from the rest) and token choice. Row i of a call with
`seed` s is the request with seed s + i * 2**32, so the same seed gives the same texts and a
row's text does not depend on the others in its call.

Beam search keeps its own loop (`run_steps`): its beams reorder their caches at every step.
Prompts of different lengths share one batch there: each row is right-aligned in a token
buffer of the model's context length, the slots before it are masked out, and its positions
count from its own first character.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from charlm_jax.data.tokenizers import Tokenizer
from charlm_jax.decoding.engine import STEPS_PER_CALL, Engine, Request, check_sampling_args
from charlm_jax.model import int8, scoring
from charlm_jax.workdir.loader import open_run

STREAM_CHUNK = 16  # tokens per chunk when the generate CLI streams
MAX_SLOTS = 64  # the most rows a Sampler decodes at once; more prompts wait for a slot
MIN_OUTPUT_BUCKET = 64  # beam search's output buffers are sized to powers of two from here
# XLA options of the beam search loop. Region analysis lets XLA:CPU update the KV cache in place
# at each step; without it every layer's cache was copied before each update
# (docs/performance.md, Decoding).
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


class DecodeState(NamedTuple):
    tokens: jax.Array  # (batch, context) the window of text, right-aligned per row at start
    filled: jax.Array  # () slots of `tokens` in use; the next token goes to this slot
    pad: jax.Array  # (batch,) slots before each row's text
    cache: object  # the model's cache pytree
    logits: jax.Array  # (batch, vocab) logits of the next token
    step: jax.Array  # () tokens generated so far


def _attention_inputs(query_slots: jax.Array, pad: jax.Array, num_slots: int):
    """Positions (batch, time) and mask (batch, time, slots) for queries at `query_slots`."""
    keys = jnp.arange(num_slots)
    mask = (keys <= query_slots[:, None]) & (keys >= pad[:, None, None])
    positions = jnp.maximum(query_slots[None, :] - pad[:, None], 0)
    return positions, mask


def prefill(model, tokens: jax.Array, filled: jax.Array, pad: jax.Array, width: int = 0):
    """Runs the buffer's first `width` slots (0: all) through the model into a cache of the
    buffer's length; returns the cache and the logits after the last filled slot, which
    must be below `width`."""
    batch, length = tokens.shape
    width = width or length
    positions, mask = _attention_inputs(jnp.arange(width), pad, length)
    logits, cache = model.forward_cached(
        tokens[:, :width], positions, mask, model.init_cache(batch, length), 0
    )
    return cache, jax.lax.dynamic_index_in_dim(logits, filled - 1, axis=1, keepdims=False)


def _make_room(s: DecodeState) -> DecodeState:
    # A row whose text fills the context drops its oldest half; the others keep their text.
    # The buffer moves left by the smallest drop (rows stay right-aligned) and each row's pad
    # then hides what it dropped.
    keep_from = jnp.where(s.pad == 0, s.tokens.shape[1] // 2, s.pad)
    move = jnp.min(keep_from)
    return s._replace(
        tokens=jnp.roll(s.tokens, -move, axis=1), filled=s.filled - move, pad=keep_from - move
    )


def _decode_one(model, s: DecodeState, token: jax.Array) -> DecodeState:
    """Appends one token per row to a buffer with room, through the cache."""
    slot = s.filled
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], slot, axis=1)
    positions, mask = _attention_inputs(slot[None], s.pad, s.tokens.shape[1])
    logits, cache = model.forward_cached(token[:, None], positions, mask, s.cache, slot)
    return DecodeState(tokens, slot + 1, s.pad, cache, logits[:, 0], s.step + 1)


def _refill(model, s: DecodeState, token: jax.Array) -> DecodeState:
    """Appends one token per row to a full buffer: make room, then prefill."""
    s = _make_room(s)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.filled, axis=1)
    # Usually every row dropped half its text: then only the kept half and the new token
    # are prefilled, not the whole buffer (docs/performance.md, Decoding).
    half = tokens.shape[1] // 2 + 1
    cache, logits = jax.lax.cond(
        s.filled < half,
        lambda: prefill(model, tokens, s.filled + 1, s.pad, width=half),
        lambda: prefill(model, tokens, s.filled + 1, s.pad),
    )
    return DecodeState(tokens, s.filled + 1, s.pad, cache, logits, s.step + 1)


def run_steps(model, state: DecodeState, extra, num_steps, choose):
    """Runs `num_steps` steps of `state, extra, token = choose(i, state, extra)` followed by
    appending `token`. Cached steps run in an inner loop while the buffer has room; a refill
    step runs between those loops, so the hot loop has no branch."""
    length = state.tokens.shape[1]

    def step_with(append):
        def step(i, carry):
            state, extra, token = choose(i, *carry)
            return append(model, state, token), extra

        return step

    def segment(carry):
        i, state, extra = carry
        end = i + jnp.minimum(num_steps - i, length - state.filled)
        state, extra = jax.lax.fori_loop(i, end, step_with(_decode_one), (state, extra))
        state, extra = jax.lax.cond(
            end < num_steps,
            lambda c: step_with(_refill)(end, c),
            lambda c: c,
            (state, extra),
        )
        return jnp.minimum(end + 1, num_steps), state, extra

    _, state, extra = jax.lax.while_loop(
        lambda c: c[0] < num_steps, segment, (jnp.int32(0), state, extra)
    )
    return state, extra


def _bucket(n: int) -> int:
    return max(MIN_OUTPUT_BUCKET, 1 << max(n - 1, 0).bit_length())


class Sampler:
    """Generates text from a trained model.

        sampler = Sampler.from_workdir("runs/default", checkpoint="best")
        sampler.generate(["ROMEO:", "JULIET:"], max_new_tokens=200, temperature=0.8)

    `sampler.model` is the NNX module (`model(tokens)` gives logits) and `sampler.tokenizer`
    its tokenizer.
    """

    def __init__(self, model: nnx.Module, tokenizer: Tokenizer, context_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        graphdef, self._state = nnx.split(model)
        self._start_id = int(tokenizer.encode("\n")[0]) if "\n" in tokenizer.chars else 0
        self._engines: dict[tuple[int, int], Engine] = {}

        def start(state, tokens, filled, pad):
            model = nnx.merge(graphdef, state)
            cache, logits = prefill(model, tokens, filled, pad)
            return DecodeState(tokens, filled, pad, cache, logits, jnp.int32(0))

        def beam(state, dstate, num_steps, out_len):
            beams = dstate.tokens.shape[0]

            def choose(i, dstate, extra):
                scores, out = extra
                logp = jax.nn.log_softmax(dstate.logits.astype(jnp.float32))
                scores, flat = jax.lax.top_k((scores[:, None] + logp).reshape(-1), beams)
                parent, token = flat // logp.shape[1], (flat % logp.shape[1]).astype(jnp.int32)
                dstate = jax.tree.map(lambda x: x[parent] if x.ndim else x, dstate)
                out = jax.lax.dynamic_update_slice_in_dim(out[parent], token[:, None], i, axis=1)
                return dstate, (scores, out), token

            # All beams start as copies of the prompt: only the first may expand at step 0.
            scores = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)
            out = jnp.zeros((beams, out_len), jnp.int32)
            model = nnx.merge(graphdef, state)
            _, (scores, out) = run_steps(model, dstate, (scores, out), num_steps, choose)
            return out[jnp.argmax(scores)], jnp.max(scores)

        self._start = jax.jit(start)
        self._beam = jax.jit(
            beam, static_argnames="out_len", compiler_options=DECODE_COMPILER_OPTIONS
        )

    @classmethod
    def from_workdir(
        cls, workdir: str | Path, checkpoint: str | int = "best", quantize: str = "none"
    ) -> Sampler:
        """Loads a trained workdir (`open_run`); `checkpoint` is "best", "latest" or a step
        number; `quantize` "int8" runs the dense layers as int8 dots (model/int8.py)."""
        run = open_run(workdir, checkpoint, quantize)
        return cls(run.model, run.tokenizer, run.context)

    def engine(self, rows: int, steps_per_call: int | None = None) -> Engine:
        """The engine this Sampler decodes `rows` prompts with: min(MAX_SLOTS, the next power
        of two) slots (one engine, compiled once, per size). A quantized model's engines of
        fewer than `int8.MIN_ROWS` slots decode with its float32 copy (faster there)."""
        slots = min(MAX_SLOTS, 1 << max(rows - 1, 0).bit_length())
        key = (slots, steps_per_call or STEPS_PER_CALL)
        if key not in self._engines:
            model = int8.for_slots(self.model, slots)
            self._engines[key] = Engine(model, self.context_length, *key)
        return self._engines[key]

    def _prompt_ids(self, prompt: str) -> np.ndarray:
        return self.tokenizer.encode(prompt) if prompt else np.array([self._start_id])

    def stream(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        chunk: int | None = None,
    ) -> Iterator[list[str]]:
        """Yields the new text of each row (the continuations only) as the engine produces
        it; with `chunk`, in pieces of exactly `chunk` tokens per row (the last shorter)."""
        check_sampling_args(temperature, top_k, top_p, max_new_tokens)
        if not prompts or not max_new_tokens:
            return
        requests = [
            Request(
                self._prompt_ids(p), max_new_tokens, temperature, top_k, top_p, seed + i * 2**32
            )
            for i, p in enumerate(prompts)
        ]
        ids: list[list[int]] = [[] for _ in prompts]  # produced, not yet yielded
        left = max_new_tokens  # tokens per row not yet yielded, with `chunk`
        for outputs in self.engine(len(prompts), chunk).generate(requests):
            for i, out in outputs:
                ids[i] += out.tokens.tolist()
            if chunk is None:
                yield [self.tokenizer.decode(row) for row in ids]
                ids = [[] for _ in prompts]
            # A chunk goes out once every row has it (rows pause at different steps to
            # rebuild their caches).
            while chunk and left and min(map(len, ids)) >= min(chunk, left):
                n = min(chunk, left)
                yield [self.tokenizer.decode(row[:n]) for row in ids]
                ids, left = [row[n:] for row in ids], left - n

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 200,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: str | None = None,
        beam_size: int = 1,
    ) -> list[str]:
        """Returns each prompt's continuation (without the prompt), cut before `stop`.

        Sampling defaults: temperature 1, no top-k (0), no top-p (1). With `beam_size` > 1,
        beam search returns the most probable continuation of `max_new_tokens` tokens;
        it takes no sampling options.
        """
        if beam_size > 1:
            if (temperature, top_k, top_p) != (None, None, None):
                raise ValueError("beam_size > 1 is deterministic: drop temperature, top_k, top_p")
            texts = [self.beam_search(p, beam_size, max_new_tokens) for p in prompts]
        else:
            if beam_size < 1:
                raise ValueError(f"beam_size must be >= 1, got {beam_size}")
            texts = ["" for _ in prompts]
            options = (
                1.0 if temperature is None else temperature,
                0 if top_k is None else top_k,
                1.0 if top_p is None else top_p,
            )
            for pieces in self.stream(prompts, max_new_tokens, *options, seed=seed):
                texts = [t + p for t, p in zip(texts, pieces, strict=True)]
        if stop:
            texts = [t.split(stop, 1)[0] for t in texts]
        return texts

    def _encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, int, np.ndarray]:
        """Beam search's buffer: the prompts right-aligned in a buffer of the context."""
        length = self.context_length
        rows = [self._prompt_ids(p)[-length:] for p in prompts]  # a longer prompt keeps its end
        filled = max(len(r) for r in rows)
        tokens = np.zeros((len(rows), length), np.int32)
        pad = np.array([filled - len(r) for r in rows], np.int32)
        for row, (ids, p) in enumerate(zip(rows, pad, strict=True)):
            tokens[row, p:filled] = ids
        return tokens, filled, pad

    def beam_search(self, prompt: str, beam_size: int, max_new_tokens: int) -> str:
        """The continuation of `max_new_tokens` tokens with the highest total
        log-probability found by a beam of `beam_size`."""
        check_sampling_args(0.0, 0, 1.0, max_new_tokens)
        tokens, filled, pad = self._encode_prompts([prompt] * beam_size)
        dstate = self._start(self._state, tokens, np.int32(filled), pad)
        out, _ = self._beam(self._state, dstate, max_new_tokens, out_len=_bucket(max_new_tokens))
        return self.tokenizer.decode(np.asarray(out)[:max_new_tokens])

    def log_probs(self, text: str, stride: int | None = None) -> np.ndarray:
        """Log-probabilities (nats) of each token of `text` after the first, given the
        ones before it, in sliding windows of the model's context (`scoring.score_tokens`:
        `stride` default half the context; the context: back-to-back windows)."""
        ids = self.tokenizer.encode(text)
        return scoring.score_tokens(self.model, ids, self.context_length, stride).log_probs

    def perplexity(self, text: str, stride: int | None = None) -> float:
        """exp of the mean negative log-probability per token of `text` (after the first)."""
        logp = self.log_probs(text, stride)
        if not len(logp):
            raise ValueError("perplexity needs a text of at least 2 tokens")
        return math.exp(-float(logp.mean()))
