"""Training and evaluation batches: random windows of a token array and their next tokens,
drawn on the device inside jit, or on the host (from a memory-mapped token file) with the
same windows for the same key and prefetched to the device by a thread."""

from __future__ import annotations

import functools
import queue
import threading

import jax
import numpy as np

PREFETCH_BATCHES = 4  # host batches prepared ahead of the training step


def step_keys(key: jax.Array, step: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """The batch key and the dropout key of training step `step` (counted from 0)."""
    batch_key, dropout_key = jax.random.split(jax.random.fold_in(key, step))
    return batch_key, dropout_key


def batch_starts(
    key: jax.Array, num_tokens: int, batch_size: int, context_length: int
) -> jax.Array:
    """The first positions of `batch_size` random windows of `context_length + 1` tokens."""
    return jax.random.randint(key, (batch_size,), 0, num_tokens - context_length)


def sample_batch(
    tokens: jax.Array, key: jax.Array, batch_size: int, context_length: int
) -> tuple[jax.Array, jax.Array]:
    """Draws `batch_size` random windows of `tokens`: inputs and next-token targets.

    Jittable: with `tokens` already on the device, the host does no per-step work.
    """
    starts = batch_starts(key, tokens.shape[0], batch_size, context_length)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (context_length + 1,)))(starts)
    return windows[:, :-1], windows[:, 1:]


_jitted_batch_starts = jax.jit(batch_starts, static_argnums=(1, 2, 3))


def _windows(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> tuple:
    """Inputs and targets of the windows at `starts` (any shape), gathered on the host."""
    offsets = np.arange(context_length + 1)
    windows = tokens[starts[..., None] + offsets].astype(np.int32)
    return windows[..., :-1], windows[..., 1:]


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _step_batch_starts(key, step, num_tokens, batch_size, context_length) -> jax.Array:
    """`batch_starts` of training step `step`: one call, the keys derived inside."""
    return batch_starts(step_keys(key, step)[0], num_tokens, batch_size, context_length)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _eval_batch_starts(key, num_tokens, batch_size, context_length, num_batches) -> jax.Array:
    """(num_batches, batch_size) window starts, batch i drawn from `fold_in(key, i)`."""
    return jax.vmap(
        lambda i: batch_starts(jax.random.fold_in(key, i), num_tokens, batch_size, context_length)
    )(np.arange(num_batches))


def sample_batch_numpy(
    tokens: np.ndarray, key: jax.Array, batch_size: int, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """`sample_batch` on the host: the same windows for the same key, gathered from a
    (memory-mapped) array with numpy, as int32."""
    starts = _jitted_batch_starts(key, len(tokens), batch_size, context_length)
    return _windows(tokens, np.asarray(starts), context_length)


def eval_batches_numpy(
    tokens: np.ndarray, key: jax.Array, batch_size: int, context_length: int, num_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (num_batches, batch_size, context_length) of the batches drawn from
    `fold_in(key, i)` for i < `num_batches` (evaluation's fixed batches): one device call
    draws every window's start."""
    starts = _eval_batch_starts(key, len(tokens), batch_size, context_length, num_batches)
    return _windows(tokens, np.asarray(starts), context_length)


class PrefetchedBatches:
    """The device batches of training steps `start_step`, `start_step + 1`, ...: each drawn
    on the host from `step_keys(key, step)` (the windows `sample_batch` would draw) by a
    background thread that keeps `PREFETCH_BATCHES` ready, placed with `sharding`.
    `close()` stops the thread."""

    def __init__(
        self,
        tokens: np.ndarray,
        key: jax.Array,
        batch_size: int,
        context_length: int,
        start_step: int,
        sharding: jax.sharding.Sharding | None = None,
    ):
        self._queue: queue.Queue = queue.Queue(PREFETCH_BATCHES)
        self._stop = threading.Event()
        args = (tokens, key, batch_size, context_length, start_step, sharding)
        self._thread = threading.Thread(target=self._fill, args=args, daemon=True)
        self._thread.start()

    def _fill(self, tokens, key, batch_size, context_length, step, sharding):
        try:
            while not self._stop.is_set():
                starts = _step_batch_starts(key, step, len(tokens), batch_size, context_length)
                batch = _windows(tokens, np.asarray(starts), context_length)
                self._put(jax.device_put(batch, sharding))
                step += 1
        except Exception as e:  # raised in the consumer by __next__
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> PrefetchedBatches:
        return self

    def __next__(self) -> tuple[jax.Array, jax.Array]:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
