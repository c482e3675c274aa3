"""The engine thread: continuous batching over the engine's slots.

Requests become sequences (one per prompt and choice) that wait in a bounded queue. One
thread owns the engine (it is not thread-safe): each turn it drops cancelled and expired
sequences, inserts waiting ones into free slots, and runs one `Engine.step()` for every
busy slot. Each sequence's new text goes to its request through a callback; stop strings
are applied here, so a stopped or cancelled sequence frees its slot before the next step.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np
from absl import logging

from charlm_jax.decoding import engine
from charlm_jax.server.prometheus import Metrics
from charlm_jax.server.protocol import ApiError


class QueueFull(Exception):
    """The waiting sequences or the tokens admitted would exceed their bounds."""


@dataclass
class Piece:
    """What one sequence produced since its last piece."""

    index: int  # the choice's index in its request
    text: str
    ids: list[int]
    starts: list[int]  # where each of `ids` starts in the choice's generated text
    logprobs: list[float] | None = None  # with `top_ids` and `top_logprobs`, when asked
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" on a sequence's last piece
    tokens: int = 0  # tokens generated so far (a stop string's tokens included)
    error: ApiError | None = None


@dataclass(eq=False)
class Sequence:
    """One choice of one prompt: its engine request, its stop strings, and where its text
    goes (`emit`, called from the engine thread)."""

    index: int
    request: engine.Request
    stops: tuple[str, ...]
    deadline: float  # time.monotonic() past which it fails
    emit: Callable[[Piece], None]
    token_text: Seq[str]  # the text of each token id
    keep_logprobs: bool = False
    cancelled: bool = False  # set by the request's handler; the engine thread frees the slot
    arrived: float = field(default_factory=time.monotonic)
    text: str = ""
    _ids: list[int] = field(default_factory=list)  # the generated tokens
    _ends: list[int] = field(default_factory=list)  # where each one's text ends
    _sent_tokens: int = 0
    _sent_chars: int = 0
    _logprobs: list = field(default_factory=lambda: [[], [], []])
    _last_output: float = 0.0

    def consume(self, out: engine.StepOutput) -> Piece:
        """Appends one step's tokens; the piece holds the text that can no longer turn
        out to be part of a stop string, and `finish_reason` once the sequence is done."""
        cut = None
        tokens = out.tokens.tolist()
        for i, token in enumerate(tokens):
            before = len(self.text)
            self.text += self.token_text[token]
            self._ends.append(len(self.text))
            if self.stops and (cut := self._stop_position(before)) is not None:
                tokens = tokens[: i + 1]
                break
        self._ids.extend(tokens)
        if self.keep_logprobs:
            new = (out.logprobs, out.top_ids, out.top_logprobs)
            for kept, values in zip(self._logprobs, new, strict=True):
                kept.extend(values[: len(tokens)].tolist())
        if cut is not None:
            self.text = self.text[:cut]
            starts = [0, *self._ends[:-1]]
            return self._piece(bisect.bisect_left(starts, cut), cut, "stop")
        if out.finished:
            return self._piece(len(self._ends), len(self.text), "length")
        ready = bisect.bisect_right(self._ends, len(self.text) - self._held_back())
        return self._piece(ready, self._ends[ready - 1] if ready else 0, None)

    def _stop_position(self, before: int) -> int | None:
        """Where the first stop string ending after `before` starts, if one does."""
        start = max(0, before - max(map(len, self.stops)) + 1)
        found = engine.stop_position(self.text[start:], self.stops)
        return None if found is None else start + found

    def _held_back(self) -> int:
        """Length of the longest end of the text that could start a stop string."""
        return max(
            (
                k
                for stop in self.stops
                for k in range(len(stop) - 1, 0, -1)
                if self.text.endswith(stop[:k])
            ),
            default=0,
        )

    def _piece(self, tokens: int, chars: int, finish_reason: str | None) -> Piece:
        """The tokens from the last piece's end to `tokens`, and their text up to `chars`."""
        first, self._sent_tokens = self._sent_tokens, tokens
        text, self._sent_chars = self.text[self._sent_chars : chars], chars
        starts = [self._ends[i - 1] if i else 0 for i in range(first, tokens)]
        piece = Piece(
            self.index,
            text,
            self._ids[first:tokens],
            starts,
            finish_reason=finish_reason,
            tokens=len(self._ids),
        )
        if self.keep_logprobs:
            piece.logprobs, piece.top_ids, piece.top_logprobs = (
                kept[first:tokens] for kept in self._logprobs
            )
        return piece

    @property
    def cost(self) -> int:
        """The tokens this sequence holds in the engine at most: its prompt and its output."""
        return len(self.request.prompt) + self.request.max_new_tokens

    def fail(self, error: ApiError) -> None:
        self.emit(Piece(self.index, "", [], [], tokens=len(self._ids), error=error))


class Scheduler:
    """Owns the engine and the thread that drives it. Admits sequences while at most
    `max_queue` wait and at most `max_tokens` tokens (prompts and outputs, and the work
    reserved outside the engine) are waiting or running; `check()` (the watchdog) fails
    everything if the thread dies or a step takes longer than `step_timeout` seconds."""

    def __init__(
        self,
        engine_: engine.Engine,
        metrics: Metrics,
        max_queue: int,
        max_tokens: int,
        step_timeout: float,
    ):
        self.engine = engine_
        self.metrics = metrics
        self.max_queue, self.max_tokens, self.step_timeout = max_queue, max_tokens, step_timeout
        self.ready = False  # compiled and serving
        self.failure: str | None = None  # why the engine thread failed or stopped serving
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: dict[int, Sequence] = {}
        self._reserved = 0  # tokens of admitted work outside the engine (`submit`)
        self._cond = threading.Condition()
        self._stopping = False
        self._step_started: float | None = None  # time.monotonic() of the step in progress
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fails what is still waiting or running (503) and ends the thread; a thread still
        warming up is not waited for (it ends once its compilation returns)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and self.ready:
            self._thread.join()

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running and not self._reserved

    def submit(self, sequences: list[Sequence], reserve: int = 0) -> None:
        """Queues a request's sequences, and admits `reserve` tokens of its work outside the
        engine (prompt scoring) until `release`; QueueFull if they do not fit now."""
        cost = sum(seq.cost for seq in sequences) + reserve
        with self._cond:
            if self.failure:
                raise ApiError(503, self.failure)
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting")
            held = sum(seq.cost for seq in [*self._waiting, *self._running.values()])
            held += self._reserved
            if held + cost > self.max_tokens:
                raise QueueFull(f"{held} tokens are admitted")
            self._reserved += reserve
            self._waiting.extend(sequences)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def release(self, reserved: int) -> None:
        """Ends the admission of `reserved` tokens of work outside the engine (`submit`)."""
        with self._cond:
            self._reserved -= reserved

    def check(self) -> str | None:
        """The watchdog, called periodically: fails the engine (and every sequence, with 503)
        if its thread ended unexpectedly or a step has run past `step_timeout`; returns why
        the engine is not serving (None: it is, or it is still warming up)."""
        started = self._step_started
        if self.ready and not self._stopping:
            if not self._thread.is_alive():
                self._fail("the engine thread ended unexpectedly")
            elif started is not None and time.monotonic() - started > self.step_timeout:
                self._fail(f"an engine step took longer than {self.step_timeout:g}s")
        return self.failure

    def _fail(self, reason: str) -> None:
        """Stops serving: every sequence fails with 503 naming `reason`."""
        logging.error("engine failed: %s", reason)
        with self._cond:
            self.failure = self.failure or reason
            self._stopping = True
            failed = [*self._running.values(), *self._waiting]
            self._running, self._waiting = {}, collections.deque()
            self._cond.notify()
        for seq in failed:
            seq.fail(ApiError(503, self.failure))

    def cancel(self, sequences: list[Sequence]) -> None:
        """Frees the sequences' slots before the next step (done ones are ignored)."""
        with self._cond:
            for seq in sequences:
                seq.cancelled = True
            self._cond.notify()

    def _run(self) -> None:
        try:
            self.engine.warm_up()  # no request then waits for a compilation
        except Exception as e:  # the service then answers 503 naming it
            logging.exception("engine warm-up failed")
            self.failure = f"the engine failed to start: {e!r}"
            return
        self.ready = True
        try:
            self._serve()
        except Exception as e:  # a bug or a broken device: stop serving, say why
            logging.exception("engine thread failed")
            self._fail(f"the engine failed: {e!r}")

    def _serve(self) -> None:
        while (admitted := self._next_admissions()) is not None:
            for seq in admitted:
                self._insert(seq)
            self._reap()
            if self._running:
                self._step()
        with self._cond:  # stopping (or failed: then both are empty)
            left = [*self._running.values(), *self._waiting]
        for seq in left:
            seq.fail(ApiError(503, "the server is shutting down"))
        self._running.clear()
        self._waiting.clear()

    def _next_admissions(self) -> list[Sequence] | None:
        """Waits for work; drops cancelled and expired waiting sequences, and returns those
        that fit in the free slots (None once stopping)."""
        with self._cond:
            while not (self._stopping or self._waiting or self._running):
                self._cond.wait()
            if self._stopping:
                return None
            now = time.monotonic()
            kept = collections.deque()
            for seq in self._waiting:
                if now > seq.deadline and not seq.cancelled:
                    seq.fail(timeout_error())
                elif not seq.cancelled:
                    kept.append(seq)
            free = self.engine.num_slots - len(self._running)
            admitted = [kept.popleft() for _ in range(min(free, len(kept)))]
            self._waiting = kept
            self.metrics.waiting.set(len(kept))
            return admitted

    def _insert(self, seq: Sequence) -> None:
        try:
            slot = self.engine.insert(seq.request)
        except Exception as e:  # a bug, not the client's: answer 500 and keep serving
            logging.exception("engine insert failed")
            seq.fail(ApiError(500, f"engine error: {e}"))
            return
        self._running[slot] = seq

    def _reap(self) -> None:
        now = time.monotonic()
        for slot, seq in list(self._running.items()):
            if seq.cancelled or now > seq.deadline:
                self.engine.free(slot)
                del self._running[slot]
                if not seq.cancelled:
                    seq.fail(timeout_error())

    def _step(self) -> None:
        """One engine step. An exception in it ends the thread (`_run`): the step donates
        the engine's state, which is then gone."""
        self.metrics.occupancy.set(len(self._running) / self.engine.num_slots)
        self.metrics.running.set(len(self._running))
        self._step_started = time.monotonic()
        outputs = self.engine.step()
        self._step_started = None
        if self.failure:  # the watchdog gave up on this step meanwhile
            return
        now = time.monotonic()
        for out in outputs:
            seq = self._running.get(out.slot)
            if seq is None or not (len(out.tokens) or out.finished):
                continue
            if np.isnan(out.logprobs).any():  # this request's numbers only: it fails alone
                self.engine.free(out.slot)
                del self._running[out.slot]
                seq.fail(ApiError(500, "the model's output for this request is not a number"))
                continue
            before = len(seq._ids)
            piece = seq.consume(out)
            self._record_timing(seq, len(seq._ids) - before, now)
            if piece.finish_reason is not None:
                if not out.finished:
                    self.engine.free(out.slot)
                del self._running[out.slot]
            if piece.text or piece.ids or piece.finish_reason:
                seq.emit(piece)
        self.metrics.running.set(len(self._running))

    def _record_timing(self, seq: Sequence, new_tokens: int, now: float) -> None:
        if not new_tokens:
            return
        self.metrics.generated_tokens.inc(new_tokens)
        if not seq._last_output:
            self.metrics.ttft.observe(now - seq.arrived)
        else:
            self.metrics.inter_token.observe((now - seq._last_output) / new_tokens)
        seq._last_output = now


def timeout_error() -> ApiError:
    """The error of a request past its deadline."""
    return ApiError(
        504, "the request took longer than the server's request_timeout", kind="timeout_error"
    )
