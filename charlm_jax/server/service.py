"""What the routes share (`Service`), and one completion request in flight (`Job`): its
sequences in the scheduler, the pieces they send back, the cache, the log line."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from absl import logging

from charlm_jax.data.tokenizers import Tokenizer
from charlm_jax.decoding import engine
from charlm_jax.model import int8
from charlm_jax.server import protocol, tokenizer_routes
from charlm_jax.server.cache import OutputCache
from charlm_jax.server.prometheus import Metrics
from charlm_jax.server.protocol import ApiError, CompletionRequest
from charlm_jax.server.scheduler import Piece, QueueFull, Scheduler, Sequence
from charlm_jax.workdir.loader import open_run


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    run_name: str  # the workdir's name
    step: int  # the checkpoint's step
    quantize: str = "none"

    @property
    def id(self) -> str:
        suffix = "" if self.quantize == "none" else f":{self.quantize}"
        return f"{self.run_name}:{self.step}{suffix}"


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    max_queue: int = 256  # sequences waiting for a slot; more get 429
    request_timeout: float = 60.0  # seconds from arrival to the last token
    max_tokens_limit: int = 2048
    log_prompts: bool = False
    cache_entries: int = 1024
    cache_bytes: int = 64 << 20
    retry_after: int = 1  # seconds, in 429 answers


class Service:
    """The scheduler over the engine, the tokenizer, the output cache and the metrics."""

    def __init__(
        self,
        engine_: engine.Engine,
        tokenizer: Tokenizer,
        info: ModelInfo,
        options: ServeOptions = ServeOptions(),
    ):
        self.info = info
        self.options = options
        self.tokenizer = tokenizer
        self.token_text = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
        # An empty prompt starts from a newline, as the Sampler's.
        self.start_id = int(tokenizer.encode("\n")[0]) if "\n" in tokenizer.chars else 0
        self.metrics = Metrics(engine_.num_slots)
        self.scheduler = Scheduler(engine_, options.max_queue, self.metrics)
        self.cache = OutputCache(options.cache_entries, options.cache_bytes)
        self.draining = False
        self.created = int(time.time())

    @classmethod
    def from_workdir(
        cls,
        workdir: Path,
        checkpoint: str | int = "best",
        num_slots: int = 16,
        quantize: str = "none",
        options: ServeOptions = ServeOptions(),
    ) -> Service:
        """Loads a trained workdir's checkpoint ("best", "latest" or a step) into an engine
        of `num_slots` slots (it compiles when the service starts); `quantize` "int8" runs
        the dense layers as int8 dots (model/int8.py). The model id names the step loaded."""
        run = open_run(workdir, checkpoint, quantize)
        engine_ = engine.Engine(int8.for_slots(run.model, num_slots), run.context_length, num_slots)
        info = ModelInfo(Path(workdir).absolute().name, run.step, run.quantize)
        return cls(engine_, run.tokenizer, info, options)

    @property
    def status(self) -> str:
        if self.scheduler.failure:
            return "failed"
        if self.draining:
            return "draining"
        return "ready" if self.scheduler.ready else "warming up"

    async def drain(self, grace: float) -> None:
        """Refuses new requests, waits up to `grace` seconds for the admitted ones, then
        ends the rest with an error and stops the engine thread."""
        self.draining = True
        deadline = time.monotonic() + grace
        while not self.scheduler.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.scheduler.stop)

    def encode(self, prompt: str | list[int]) -> np.ndarray:
        """A prompt's token ids (text encoded, or token ids checked); ApiError(400)."""
        if not isinstance(prompt, str):
            return tokenizer_routes.token_ids(prompt, self.tokenizer.vocab_size, "prompt")
        if not prompt:
            return np.array([self.start_id], np.int32)
        try:
            return self.tokenizer.encode(prompt).astype(np.int32)
        except ValueError as e:  # an unknown character, named
            raise ApiError(400, f"prompt: {e}", param="prompt") from None

    def start(self, body: CompletionRequest, record: RequestRecord) -> Job:
        """A job for the request: from the cache, or queued for the engine."""
        if body.model not in (None, self.info.id, self.info.run_name):
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.info.id!r}",
                param="model",
                code="model_not_found",
            )
        if self.scheduler.failure:
            raise ApiError(503, self.scheduler.failure)
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        key = body.cache_key(self.info.id, self.info.step, self.info.quantize)
        cached = self.cache.get(key) if body.deterministic else None
        if body.deterministic:
            (self.metrics.cache_hits if cached else self.metrics.cache_misses).inc()
        job = Job(self, body, record, key if body.deterministic else None, cached)
        if cached is None:
            try:
                self.scheduler.submit(job.sequences)
            except QueueFull:
                raise ApiError(
                    429,
                    f"too many requests waiting (max_queue={self.options.max_queue}); retry later",
                    kind="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(self.options.retry_after)},
                ) from None
        return job


@dataclasses.dataclass
class RequestRecord:
    """What the request's log line and metrics say."""

    service: Service
    id: str = dataclasses.field(default_factory=lambda: f"cmpl-{secrets.token_hex(12)}")
    started: float = dataclasses.field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompts: list[str] | None = None
    cached: bool = False

    def finish(self, status: int) -> None:
        latency = time.monotonic() - self.started
        metrics = self.service.metrics
        metrics.requests.labels(str(status)).inc()
        metrics.latency.observe(latency)
        line = (
            f"request {self.id} status={status} prompt_tokens={self.prompt_tokens} "
            f"completion_tokens={self.completion_tokens} latency={latency:.3f}s"
        )
        if self.cached:
            line += " cached"
        if self.service.options.log_prompts and self.prompts is not None:
            line += f" prompt={self.prompts!r}"
        logging.info(line)


class Job:
    """A completion request in flight: its sequences (or its cached answer), and the
    choices built from what comes back."""

    def __init__(
        self,
        service: Service,
        body: CompletionRequest,
        record: RequestRecord,
        cache_key: str | None,
        cached: dict | None,
    ):
        self.service, self.body, self.record = service, body, record
        self.cache_key, self.cached = cache_key, cached
        record.prompts, record.cached = body.prompts, cached is not None
        self.created = int(time.time())
        self.queue: asyncio.Queue[Piece] = asyncio.Queue()
        self.sequences = [] if cached else self._sequences()
        self.result: dict | None = None

    def _sequences(self) -> list[Sequence]:
        body, service = self.body, self.service
        loop = asyncio.get_running_loop()

        def emit(piece: Piece) -> None:  # from the engine thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(self.queue.put_nowait, piece)

        prompts = [service.encode(p) for p in body.prompts]
        self.record.prompt_tokens = sum(len(p) for p in prompts)
        service.metrics.prompt_tokens.inc(self.record.prompt_tokens)
        # Choice j of n uses seed + j, so choice 0 is the request with that seed alone.
        seed = secrets.randbelow(protocol.MAX_SEED) if body.seed is None else body.seed
        deadline = time.monotonic() + service.options.request_timeout
        return [
            Sequence(
                index=i * body.n + j,
                request=engine.Request(
                    prompt,
                    body.max_tokens,
                    body.temperature,
                    body.top_k,
                    body.top_p,
                    (seed + j) % (protocol.MAX_SEED + 1),
                ),
                stops=body.stops,
                deadline=deadline,
                emit=emit,
                token_text=service.token_text,
                keep_logprobs=body.logprobs is not None,
            )
            for i, prompt in enumerate(prompts)
            for j in range(body.n)
        ]

    def cancel(self) -> None:
        self.service.scheduler.cancel(self.sequences)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return protocol.completion_json(
            self.record.id, self.created, self.service.info.id, choices, usage
        )

    async def deltas(self) -> AsyncIterator[list[dict]]:
        """Yields the choices' new text as lists of stream-chunk choices (what has come
        since the last list); `self.result` then holds the whole completion (choices and
        usage). Raises ApiError if a sequence failed."""
        if self.cached:
            yield self.cached["choices"]
            self.result = self.cached
            self.record.completion_tokens = self.cached["usage"]["completion_tokens"]
            return
        body = self.body
        choices = [
            {"index": c, "text": "", "logprobs": None, "finish_reason": None}
            for c in range(len(self.sequences))
        ]
        if body.echo:
            decode = self.service.tokenizer.decode
            for c, choice in enumerate(choices):
                prompt = body.prompts[c // body.n]
                choice["text"] = prompt if isinstance(prompt, str) else decode(prompt)
            yield [dict(choice) for choice in choices]
        left, tokens = len(choices), 0
        while left:
            pieces = [await self.queue.get()]
            while not self.queue.empty():  # what the engine thread sent meanwhile
                pieces.append(self.queue.get_nowait())
            deltas = []
            for piece in pieces:
                if piece.error:
                    raise piece.error
                deltas.append(self._delta(piece))
                _merge(choices[piece.index], deltas[-1])
                if piece.finish_reason:
                    left, tokens = left - 1, tokens + piece.tokens
            yield deltas
        self.record.completion_tokens = tokens
        self.result = {
            "choices": choices,
            "usage": protocol.usage_json(self.record.prompt_tokens, tokens),
        }
        if self.cache_key:
            self.service.cache.put(self.cache_key, self.result)

    def _delta(self, piece: Piece) -> dict:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = protocol.logprobs_json(
                self.service.token_text,
                piece.ids,
                piece.logprobs,
                piece.top_ids,
                piece.top_logprobs,
                piece.starts,
                self.body.logprobs,
            )
        return {
            "index": piece.index,
            "text": piece.text,
            "logprobs": logprobs,
            "finish_reason": piece.finish_reason,
        }


def _merge(choice: dict, delta: dict) -> None:
    choice["text"] += delta["text"]
    choice["finish_reason"] = delta["finish_reason"]
    if delta["logprobs"] is not None:
        if choice["logprobs"] is None:
            choice["logprobs"] = {name: [] for name in delta["logprobs"]}
        for name, values in delta["logprobs"].items():
            choice["logprobs"][name].extend(values)
