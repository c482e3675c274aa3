"""A decode engine: continuous batching over a fixed number of slots.

Each slot holds one request: its window of text in the model's cache rows (token i of the
window at cache column i and position i), its next-token logits, its sampling parameters and
seed, the number of tokens it has drawn (its noise counter) and the number it still has to
produce. `insert` prefills a prompt into a free slot; `step` advances every active slot by up
to `steps_per_call` tokens in one jitted call whose shapes never depend on how many slots are
busy (but on the number of cache blocks the active windows can reach by the call's end: one
compiled call per block count); `free` releases a slot. The state lives on the device and is
donated to each call.

Context policy (of every decoder here, beam search included): a prompt longer than the
context keeps its last `context_length` tokens. When a slot's window fills the context, the
token drawn from the full window is emitted, the slot pauses for the rest of the call, and its
cache is rebuilt from the newest half of the window plus that token (`newest_half`) by the
same `prefill` as `insert` (positions then count from the kept text's start), at the start of
the next `step`.

Exactness: every computation on a slot reads only that slot's rows, and its noise comes from
its own seed and counter, so a request gives the same bits in any slot, beside any
neighbours, inserted at any time (tests/test_engine.py); the number of cache blocks a call
reads, which its neighbours decide, does not change its bits either (the attention adds the
blocks past its window as exact zeros). Prefills are batched by length
bucket; a prefill's padding sits after the prompt, where causal attention never looks.
Prefilled alone or in a batch, a request gives the same tokens, its log-probabilities equal
up to float rounding (XLA:CPU rounds a matmul's rows differently with their number).

The model-level pieces, `prefill` (windows into a new cache) and `append` (one token per cache
row), are pure functions: the engine's jitted calls and beam search (decoding/beam.py) are
built from them.

Token choice, per slot: top-k filtering, then top-p (nucleus) on the remaining
probabilities, then temperature; temperature 0 is greedy. A slot's n-th draw uses Gumbel
noise hashed from its seed and n.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from charlm_jax.errors import UserError
from charlm_jax.model import int8, random_bits
from charlm_jax.model.models import KV_BLOCK

TOP_LOGPROBS = 5  # alternatives reported per token
# Tokens per jitted call: enough to amortise the dispatch and the host's bookkeeping (each
# call is one device round trip), few enough that a new request waits little for a slot
# and that a finished or full slot idles little until the call ends (docs/decoding.md).
STEPS_PER_CALL = 16
MIN_PREFILL = 8  # the narrowest prefill: fewer compiled shapes, little waste
# XLA options of the decode loops. Region analysis lets XLA:CPU update the KV cache in place
# at each step; without it every layer's cache was copied before each update
# (docs/performance.md, Decoding).
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
INT32_MAX = 2**31 - 1


class SamplingParams(NamedTuple):
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def check_sampling_args(temperature: float, top_k: int, top_p: float, max_new_tokens: int):
    """Raises UserError naming the first bad argument: each value must fit the float32 and
    int32 arrays of a step, so that a bad request fails alone, before it reaches a slot."""
    if not 0 <= temperature <= FLOAT32_MAX:
        raise UserError(f"temperature must be >= 0 (0 is greedy) and finite, got {temperature}")
    if not FLOAT32_TINY <= top_p <= 1:  # a smaller top_p is 0 in float32: no filtering
        raise UserError(f"top_p must be in (0, 1] (and >= {FLOAT32_TINY:.3g}), got {top_p}")
    if not 0 <= top_k <= INT32_MAX:
        raise UserError(f"top_k must be >= 0 (0 disables it) and <= {INT32_MAX}, got {top_k}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def check_prompt(prompt: np.ndarray, vocab_size: int | None = None) -> None:
    """Raises UserError unless `prompt` is a non-empty 1-D array of token ids (in
    [0, vocab_size) when it is given)."""
    if np.ndim(prompt) != 1 or len(prompt) < 1:
        raise UserError("prompt must be a non-empty 1-D array of token ids")
    prompt = np.asarray(prompt)
    bad = prompt[(prompt < 0) | (prompt >= vocab_size)] if vocab_size else []
    if len(bad):
        raise UserError(f"token id {bad[0]} outside the vocabulary of {vocab_size}")


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets to -inf the logits (vocab,) outside the top k (k=0: all), then outside the
    smallest set of the remaining tokens whose probability reaches top_p."""
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits)
    keep_k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    descending = jnp.where(jnp.arange(vocab) < keep_k, descending, -jnp.inf)
    probs = jax.nn.softmax(descending)
    within_p = jnp.sum(jnp.cumsum(probs) - probs < top_p)  # >= 1: the top token always stays
    # The float32 cumsum can end just under 1, which would count the tokens top-k removed.
    keep = jnp.where(top_p < 1, jnp.minimum(within_p, keep_k), keep_k)
    threshold = descending[keep - 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def gumbel_noise(seed: jax.Array, step: jax.Array, size: int) -> jax.Array:
    """Standard Gumbel noise (size,) for a row's draw number `step`, from the row's `seed`
    (two uint32) through a hashed counter: no threefry chain per token, which cost small
    models a fifth of their decode speed (docs/performance.md, Decoding)."""
    bits = random_bits.hashed_bits(seed, (size,), offset=step.astype(jnp.uint32) * size)
    uniform = ((bits >> 8).astype(jnp.float32) + 0.5) * 2.0**-24  # 24 bits, in (0, 1)
    return -jnp.log(-jnp.log(uniform))


def choose_tokens(
    logits: jax.Array, seeds: jax.Array, steps: jax.Array, params: SamplingParams
) -> jax.Array:
    """Each row's next token from its logits (rows, vocab): its `steps[row]`-th draw with
    its `seeds[row]` and its own sampling parameters (arrays of (rows,))."""
    logits = logits.astype(jnp.float32)
    need = (params.top_k > 0) | (params.top_p < 1)
    filtered = jax.lax.cond(  # plain sampling skips the sort and cumsum; a row that needs
        jnp.any(need),  # no filter keeps its logits exactly whatever its neighbours need
        lambda: jnp.where(
            need[:, None], jax.vmap(filter_logits)(logits, params.top_k, params.top_p), logits
        ),
        lambda: logits,
    )
    temperature = jnp.maximum(params.temperature, 1e-6)[:, None]
    noise = jax.vmap(gumbel_noise, (0, 0, None))(seeds, steps, logits.shape[-1])
    sampled = jnp.argmax(filtered / temperature + noise, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    return jnp.where(params.temperature > 0, sampled, greedy).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Request:
    """One sequence to continue. `prompt`: int32 token ids (longer than the context: the
    last context's worth is kept). temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    prompt: np.ndarray
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_prompt(self.prompt)


class StepOutput(NamedTuple):
    """What one slot produced in one `Engine.step`."""

    slot: int
    tokens: np.ndarray  # (n,) int32 new tokens
    logprobs: np.ndarray  # (n,) log-probability of each under the unfiltered distribution
    top_ids: np.ndarray  # (n, TOP_LOGPROBS) the most likely tokens at each step
    top_logprobs: np.ndarray  # (n, TOP_LOGPROBS) their log-probabilities
    finished: bool  # max_new_tokens reached: the slot is free again


class EngineFull(ValueError):
    """insert() found no free slot."""


class EngineState(NamedTuple):
    cache: object  # the model's cache pytree, one row per slot, `context_length` columns
    logits: jax.Array  # (slots, vocab) float32 logits of each slot's next token
    length: jax.Array  # (slots,) tokens in the window; context_length + 1: awaiting a rebuild
    drawn: jax.Array  # (slots,) tokens drawn so far: the noise counter
    remaining: jax.Array  # (slots,) tokens still to produce; 0: idle
    seeds: jax.Array  # (slots, 2) uint32
    params: SamplingParams  # of (slots,) arrays


class _Prefill(NamedTuple):
    """A slot's pending prefill: its window and the state it resumes with."""

    window: np.ndarray
    request: Request
    drawn: int


def seed_bits(seed: int) -> np.ndarray:
    """The (2,) uint32 noise seed of an integer seed: splitmix64 of it."""
    z = (int(seed) + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    return np.array([z & 0xFFFFFFFF, z >> 32], np.uint32)


def newest_half(window, context_length: int):
    """What a window that overflowed the context (`context_length` + 1 tokens, along its last
    axis) keeps: its newest half, plus the token that overflowed."""
    return window[..., context_length // 2 :]


def rebuilt_length(context_length: int) -> int:
    """The length of a window rebuilt by `newest_half`."""
    return context_length + 1 - context_length // 2


def prefill_buckets(context_length: int) -> list[int]:
    """Prefill widths: powers of two from MIN_PREFILL below the context, the context, and
    the width of a rebuild after a full window (the newest half plus one token)."""
    powers = {1 << i for i in range(context_length.bit_length())}
    powers = {p for p in powers if MIN_PREFILL <= p < context_length}
    return sorted(powers | {context_length, rebuilt_length(context_length)})


def visible_columns(columns: int, context_length: int) -> int:
    """The cache columns a call reads to see the first `columns`: whole KV_BLOCKs, at most
    the context."""
    return min(-(-columns // KV_BLOCK) * KV_BLOCK, context_length)


def stop_position(text: str, stops: Iterable[str]) -> int | None:
    """Where the first of `stops` to occur in `text` begins (None: none does)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _row_buckets(num_slots: int) -> list[int]:
    return sorted({4**i for i in range(8) if 4**i < num_slots} | {num_slots})


def _smallest_at_least(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class _Program(NamedTuple):
    """A model's graph and weights (beam search runs them too) and the engine's jitted
    calls over them."""

    graphdef: object
    weights: object
    step: object  # (weights, state, released, columns) -> (state, outputs)
    prefill: object  # (weights, state, index, tokens, lengths, ...) -> state


def _program(model: nnx.Module, context_length: int, steps_per_call: int) -> _Program:
    graphdef, weights = nnx.split(model)
    step = jax.jit(  # compiled once per number of cache columns read (a static argument)
        lambda w, s, r, columns: _decode(
            nnx.merge(graphdef, w), s, r, steps_per_call, context_length, columns
        ),
        static_argnums=3,
        donate_argnums=1,
        compiler_options=COMPILER_OPTIONS,
    )
    prefill = jax.jit(
        lambda w, s, *rows: _prefill(nnx.merge(graphdef, w), context_length, s, *rows),
        donate_argnums=1,
    )
    return _Program(graphdef, weights, step, prefill)


class Engine:
    """Decodes up to `num_slots` requests at once with `model`, any module implementing
    the cached-decoding protocol (`init_cache`, `forward_cached`) over `context_length`.

        engine = Engine(model, 256, num_slots=16)
        slot = engine.insert(Request(prompt_ids, max_new_tokens=100, seed=1))
        while engine.active_slots():
            for out in engine.step(): ...

    A quantized model (model/int8.py) decodes through int8 dots or through its float32 copy
    (`int8.dequantize_model`), whichever `warm_up` measures faster at `num_slots` slots;
    `int8_dots` True or False forces the choice; before `warm_up`, int8 dots from
    `int8.MIN_ROWS` slots (below, float32 ones are faster on a CPU). The attribute
    `int8_dots` says which runs.

    Not thread-safe: one thread drives it.
    """

    def __init__(
        self,
        model: nnx.Module,
        context_length: int,
        num_slots: int = 16,
        steps_per_call: int = STEPS_PER_CALL,
        int8_dots: bool | None = None,
    ):
        if num_slots < 1 or steps_per_call < 1 or context_length < 2:
            raise UserError(
                f"need num_slots >= 1, steps_per_call >= 1, context_length >= 2; got "
                f"{num_slots}, {steps_per_call}, {context_length}"
            )
        self.num_slots, self.steps_per_call = num_slots, steps_per_call
        self.context_length = context_length
        self._model = model
        quantized = int8.is_quantized(model)
        self._measure = quantized and int8_dots is None  # by warm_up
        if int8_dots is None:
            int8_dots = num_slots >= int8.MIN_ROWS
        self.int8_dots = quantized and int8_dots
        self._use(self._compile(self.int8_dots))
        self._buckets = prefill_buckets(context_length)
        self._rows = _row_buckets(num_slots)
        self._requests: list[Request | None] = [None] * num_slots
        self._windows: list[np.ndarray | None] = [None] * num_slots
        self._drawn = [0] * num_slots
        self._pending: dict[int, _Prefill] = {}
        self._released = np.zeros(num_slots, bool)
        # The decode call reads the cache blocks its slots' windows reach: one program each.
        self._columns = sorted(
            {visible_columns(c, context_length) for c in range(1, context_length + 1)}
        )
        graphdef = self.graphdef
        empty = jax.jit(lambda w: _empty_state(nnx.merge(graphdef, w), num_slots, context_length))
        self._state = empty(self.weights)
        self.vocab_size = self._state.logits.shape[1]

    def _compile(self, int8_dots: bool) -> _Program:
        model = self._model if int8_dots else int8.dequantize_model(self._model)
        return _program(model, self.context_length, self.steps_per_call)

    def _use(self, program: _Program) -> None:
        self.graphdef, self.weights = program.graphdef, program.weights
        self._step, self._prefill = program.step, program.prefill

    def warm_up(self) -> None:
        """Chooses between int8 and float32 dots for a quantized model (unless forced), then
        compiles every shape a run can need (the decode call for each number of cache blocks
        read, each prefill width for each row count), so that no request waits for a
        compilation later. Needs an idle engine."""
        if self.active_slots():
            raise UserError("warm_up() needs an idle engine")
        if self._measure:
            self._choose_dots()
        for width in self._buckets:
            for rows in self._rows:
                self._prefill_rows(width, [None] * rows)  # padding rows: the state is unchanged
        for columns in self._columns:
            self._state, _ = self._step(self.weights, self._state, self._idle(), columns)

    def _choose_dots(self) -> None:
        """Times the decode call (its narrowest) with int8 dots and with the float32 copy,
        alternated, and keeps the faster (the best of three timed calls each)."""
        programs = {dots: self._compile(dots) for dots in (True, False)}
        best = dict.fromkeys(programs, math.inf)
        for _ in range(4):  # the first call of each compiles: the best of the rest counts
            for dots, program in programs.items():
                start = time.perf_counter()
                self._state, out = program.step(
                    program.weights, self._state, self._idle(), self._columns[0]
                )
                jax.block_until_ready(out)
                best[dots] = min(best[dots], time.perf_counter() - start)
        self.int8_dots = best[True] <= best[False]
        self._measure = False
        self._use(programs[self.int8_dots])
        logging.info(
            "engine of %d slots decodes with %s dots (a decode call: int8 %.1f ms, float32 "
            "%.1f ms)", self.num_slots, "int8" if self.int8_dots else "float32",
            1e3 * best[True], 1e3 * best[False],
        )  # fmt: skip

    def _idle(self) -> np.ndarray:
        return np.zeros(self.num_slots, bool)

    def compiled_step(self, columns: int):
        """The compiled decode call that reads the first `columns` cache columns (rounded up
        to whole blocks), as XLA built it (`.as_text()` gives its HLO)."""
        columns = visible_columns(columns, self.context_length)
        return self._step.lower(self.weights, self._state, self._idle(), columns).compile()

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self._requests) if r is None]

    def active_slots(self) -> list[int]:
        return [i for i, r in enumerate(self._requests) if r is not None]

    def insert(self, request: Request) -> int:
        """Assigns `request` a free slot (its prefill runs at the next `step`); raises
        EngineFull if every slot is busy."""
        free = self.free_slots()
        if not free:
            raise EngineFull(f"no free slot (num_slots={self.num_slots} busy)")
        prompt = np.asarray(request.prompt)
        check_prompt(prompt, self.vocab_size)
        slot = free[0]
        self._requests[slot], self._drawn[slot] = request, 0
        self._released[slot] = False
        window = prompt[-self.context_length :].astype(np.int32)
        self._pending[slot] = _Prefill(window, request, 0)
        return slot

    def free(self, slot: int) -> None:
        """Stops the request in `slot` (if any) and frees the slot."""
        if self._requests[slot] is not None:
            self._requests[slot] = None
            self._pending.pop(slot, None)
            self._released[slot] = True

    def step(self) -> list[StepOutput]:
        """Runs the pending prefills, then advances every active slot by up to
        steps_per_call tokens in one call; returns what each active slot produced."""
        self._run_prefills()
        if not self.active_slots():
            return []
        self._state, out = self._step(
            self.weights, self._state, self._released, self._columns_needed()
        )
        self._released = self._idle()
        tokens, logprobs, top_ids, top_logprobs = (np.asarray(a).swapaxes(0, 1) for a in out)
        results = []
        for slot in self.active_slots():
            n = int(np.sum(tokens[slot] >= 0))  # a slot's tokens come first, then -1s
            finished = self._advance(slot, tokens[slot, :n])
            results.append(
                StepOutput(
                    slot,
                    tokens[slot, :n],
                    logprobs[slot, :n],
                    top_ids[slot, :n],
                    top_logprobs[slot, :n],
                    finished,
                )
            )
        return results

    def generate(self, requests: Iterable[Request]) -> Iterator[list[tuple[int, StepOutput]]]:
        """Runs `requests`, inserting each as a slot frees; yields, per step, the outputs
        as (index of the request, output)."""
        queue = iter(enumerate(requests))
        owner: dict[int, int] = {}
        waiting = next(queue, None)
        while waiting is not None or owner:
            while waiting is not None and self.free_slots():
                owner[self.insert(waiting[1])] = waiting[0]
                waiting = next(queue, None)
            outputs = self.step()
            yield [(owner[o.slot], o) for o in outputs]
            for o in outputs:
                if o.finished:
                    del owner[o.slot]

    def _columns_needed(self) -> int:
        """The cache columns this call's active slots can reach: each window plus the
        tokens of the call, in whole blocks, at most the context."""
        reach = max(len(self._windows[slot]) for slot in self.active_slots())
        return visible_columns(reach + self.steps_per_call, self.context_length)

    def _advance(self, slot: int, new: np.ndarray) -> bool:
        """Host bookkeeping after `slot` produced `new` tokens; returns whether it finished."""
        request = self._requests[slot]
        self._drawn[slot] += len(new)
        window = np.concatenate([self._windows[slot], new])
        finished = self._drawn[slot] >= request.max_new_tokens
        if len(window) > self.context_length:  # full: rebuild from the newest half
            window = newest_half(window, self.context_length)
            if not finished:
                self._pending[slot] = _Prefill(window, request, self._drawn[slot])
        self._windows[slot] = window
        if finished:
            self._requests[slot] = None
        return finished

    def _run_prefills(self) -> None:
        """Prefills the pending slots, batched by width bucket."""
        groups: dict[int, list[int]] = {}
        for slot, p in self._pending.items():
            self._windows[slot] = p.window
            groups.setdefault(_smallest_at_least(self._buckets, len(p.window)), []).append(slot)
        for width, slots in groups.items():
            for start in range(0, len(slots), self.num_slots):
                self._prefill_rows(width, slots[start : start + self.num_slots])
        self._pending.clear()

    def _prefill_rows(self, width: int, slots: list[int]) -> None:
        rows = _smallest_at_least(self._rows, len(slots))
        tokens = np.zeros((rows, width), np.int32)
        index = np.full(rows, self.num_slots, np.int32)  # padding rows write nowhere
        lengths, drawn, remaining = (np.ones(rows, np.int32) for _ in range(3))
        seeds = np.zeros((rows, 2), np.uint32)
        temperature, top_p = np.ones(rows, np.float32), np.ones(rows, np.float32)
        top_k = np.zeros(rows, np.int32)
        for i, slot in enumerate(s for s in slots if s is not None):
            p = self._pending[slot]
            r = p.request
            tokens[i, : len(p.window)], lengths[i], index[i] = p.window, len(p.window), slot
            drawn[i], remaining[i] = p.drawn, r.max_new_tokens - p.drawn
            seeds[i] = seed_bits(r.seed)
            temperature[i], top_k[i], top_p[i] = r.temperature, r.top_k, r.top_p
        params = SamplingParams(temperature, top_k, top_p)
        self._state = self._prefill(
            self.weights, self._state, index, tokens, lengths, drawn, remaining, seeds, params
        )


def prefill(model, tokens: jax.Array, lengths: jax.Array, context_length: int):
    """Runs the windows `tokens` (rows, width), `lengths` long, into a new cache of
    `context_length` columns (token i at column i and position i); returns each row's
    next-token logits (rows, vocab) in float32 and the cache. Padding after a window is
    inert: causal attention never looks forward (nor past the window's last block)."""
    rows, width = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(width), (rows, width))
    columns = visible_columns(width, context_length)
    causal = jnp.arange(columns)[None, :] <= jnp.arange(width)[:, None]
    mask = jnp.broadcast_to(causal, (rows, width, columns))
    cache = model.init_cache(rows, context_length)
    logits, cache = model.forward_cached(tokens, positions, mask, cache, 0)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last.astype(jnp.float32), cache


def append(
    model,
    cache,
    tokens: jax.Array,
    lengths: jax.Array,
    context_length: int,
    columns: int | None = None,
):
    """Appends each row's token (rows,) to its window of `lengths[row]` tokens: writes it at
    that cache column and position and attends to the columns up to it; returns the rows'
    next-token logits (rows, vocab) in float32 and the cache. Only the first `columns` cache
    columns are read (default: all; whole blocks, see `visible_columns`): a row whose window
    reaches past them sees the rest as masked. A row's logits do not depend on `columns`
    (models.CausalSelfAttention._attend_cached). A full row (length >= context_length)
    writes over its last column: its caller discards the result."""
    at = jnp.minimum(lengths, context_length - 1)
    columns = visible_columns(columns or context_length, context_length)
    mask = (jnp.arange(columns) <= at[:, None])[:, None, :]
    logits, cache = model.forward_cached(tokens[:, None], at[:, None], mask, cache, at)
    return logits[:, 0].astype(jnp.float32), cache


def _empty_state(model, num_slots: int, context_length: int) -> EngineState:
    cache = model.init_cache(num_slots, context_length)
    ids = jnp.zeros(num_slots, jnp.int32)
    logits = jax.eval_shape(lambda: append(model, cache, ids, ids, context_length)[0])
    zeros = jnp.zeros(num_slots, jnp.int32)
    return EngineState(
        cache,
        jnp.zeros((num_slots, logits.shape[-1]), jnp.float32),
        zeros,
        zeros,
        zeros,
        jnp.zeros((num_slots, 2), jnp.uint32),
        SamplingParams(jnp.ones(num_slots), zeros, jnp.ones(num_slots)),
    )


def _decode(
    model, s: EngineState, released: jax.Array, steps: int, context_length: int, columns: int
):
    """`steps` tokens for every active slot, reading the first `columns` cache columns (the
    active windows stay within them); returns the state and, per step and slot, the token
    (-1: none), its log-probability and the top alternatives."""
    s = s._replace(remaining=jnp.where(released, 0, s.remaining))

    def step(s: EngineState, _):
        emit = (s.remaining > 0) & (s.length <= context_length)
        token = choose_tokens(s.logits, s.seeds, s.drawn, s.params)
        logp = jax.nn.log_softmax(s.logits)
        top_logp, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
        chosen = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
        # A full slot emits its token but does not append it: the host rebuilds its cache.
        # The rows that do not append write past their text (or into a slot being rebuilt).
        appended = emit & (s.length < context_length)
        logits, cache = append(model, s.cache, token, s.length, context_length, columns)
        s = EngineState(
            cache,
            jnp.where(appended[:, None], logits, s.logits),
            jnp.where(emit & ~appended, context_length + 1, s.length + appended),
            s.drawn + emit,
            s.remaining - emit,
            s.seeds,
            s.params,
        )
        return s, (jnp.where(emit, token, -1), chosen, top_ids.astype(jnp.int32), top_logp)

    return jax.lax.scan(step, s, length=steps)


def _prefill(
    model, context_length, s: EngineState, index, tokens, lengths, drawn, remaining, seeds, params
):
    """Runs the windows `tokens` (rows, width), `lengths` long, into the slots `index`
    (num_slots: a padding row), with their counters, seeds and sampling parameters."""
    last, cache = prefill(model, tokens, lengths, context_length)

    def put(full, new):
        return full.at[index].set(new.astype(full.dtype), mode="drop")

    return EngineState(
        jax.tree.map(put, s.cache, cache),
        put(s.logits, last),
        put(s.length, lengths),
        put(s.drawn, drawn),
        put(s.remaining, remaining),
        put(s.seeds, seeds),
        jax.tree.map(put, s.params, params),
    )
