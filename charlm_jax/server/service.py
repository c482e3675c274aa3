"""What the routes share (`Service`), and one completion request in flight (`Job`): its
sequences in the scheduler, the pieces they send back, the cache, the log line."""

from __future__ import annotations

import asyncio
import concurrent.futures
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
from charlm_jax.errors import UserError
from charlm_jax.model.scoring import TextScore
from charlm_jax.server import protocol, tokenizer_routes
from charlm_jax.server.cache import OutputCache
from charlm_jax.server.prometheus import Metrics
from charlm_jax.server.protocol import ApiError, CompletionRequest
from charlm_jax.server.scheduler import Piece, QueueFull, Scheduler, Sequence
from charlm_jax.server.scorer import Scorer
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
    """The operator's bounds (docs/serving.md lists them as flags)."""

    max_queue: int = 256  # sequences waiting for a slot; more get 429
    max_request_tokens: int = 1 << 16  # prompts x n x (prompt + max_tokens); more get 400
    max_queued_tokens: int = 1 << 18  # the same summed over admitted requests; more get 429
    request_timeout: float = 60.0  # seconds from arrival to the last token
    step_timeout: float = 30.0  # seconds an engine step may take before the engine is failed
    max_tokens_limit: int = 2048
    max_body_bytes: int = 1 << 20  # request bodies; more get 413
    body_timeout: float = 10.0  # seconds to receive a body; slower get 408
    send_timeout: float = 30.0  # seconds a stream may wait for its client to read
    api_key: str | None = None  # required as `Authorization: Bearer KEY` (not by /health)
    allowed_hosts: tuple[str, ...] = ()  # Host header names allowed (empty: any)
    log_prompts: bool = False
    cache_entries: int = 1024
    cache_bytes: int = 64 << 20
    retry_after: int = 1  # seconds, in 429 answers

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, zero_ok = getattr(self, field.name), field.name.startswith("cache_")
            if field.type in ("int", "float") and not (value >= 0 if zero_ok else value > 0):
                raise UserError(f"{field.name} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


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
        self.scheduler = Scheduler(
            engine_, self.metrics, options.max_queue, options.max_queued_tokens,
            options.step_timeout,
        )  # fmt: skip
        self.scorer = Scorer(engine_)
        self.limits = protocol.Limits(
            engine_.vocab_size, engine_.context_length, options.max_tokens_limit
        )
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
        of `num_slots` slots (it compiles when the service starts); `quantize` "int8" loads
        the int8 model (model/int8.py), which decodes through int8 dots or its float32 copy,
        whichever the engine measured faster at its warm-up (`decode_dots`); the model id
        names the step loaded and the quantization."""
        run = open_run(workdir, checkpoint, quantize)
        engine_ = engine.Engine(run.model, run.context_length, num_slots)
        info = ModelInfo(Path(workdir).absolute().name, run.step, run.quantize)
        return cls(engine_, run.tokenizer, info, options)

    @property
    def decode_dots(self) -> str:
        """What the engine's dense layers run: "int8" or "float32" dots."""
        return "int8" if self.scheduler.engine.int8_dots else "float32"

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
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        """Ends the engine thread (failing what it still holds) and the scorer's queue."""
        self.scheduler.stop()
        self.scorer.stop()

    def encode(self, prompt: str | list[int]) -> np.ndarray:
        """A prompt's token ids (text encoded, or token ids checked); ApiError(400)."""
        if not isinstance(prompt, str):
            return tokenizer_routes.token_ids(prompt, self.tokenizer.vocab_size, "prompt")
        try:
            return self.tokenizer.encode(prompt).astype(np.int32)
        except ValueError as e:  # an unknown character, named
            raise ApiError(400, f"prompt: {e}", param="prompt") from None

    def prepare(self, body: bytes) -> Prepared:
        """The checked request, its prompts' tokens and its cache key: the work done before
        the engine, which grows with the body (the app runs it off the event loop)."""
        request = protocol.parse_request(body, self.limits)
        own = [self.encode(p) for p in request.prompts]
        # The model's prompts: an empty one starts from a newline, as the Sampler's; only
        # those it continues must fit its context (a scored prompt is read in windows).
        prompts = [p if len(p) else np.array([self.start_id], np.int32) for p in own]
        if request.max_tokens:
            prompts = [self._fit(p, request.truncate_prompt_tokens) for p in prompts]
        key = request.cache_key(self.info.id, self.info.step, self.info.quantize)
        prepared = Prepared(
            request,
            prompts,
            own if request.scores_prompts else None,
            key if request.deterministic else None,
        )
        self._check_work(prepared)
        return prepared

    def _check_work(self, prepared: Prepared) -> None:
        """ApiError(400) if the request's work could never be admitted."""
        sequences, tokens = prepared.sequences, prepared.engine_tokens + prepared.scored_tokens
        most = min(self.options.max_request_tokens, self.options.max_queued_tokens)
        if tokens > most or sequences > self.options.max_queue:
            raise ApiError(
                400,
                f"the request needs {sequences} sequences and {tokens} tokens "
                "(prompts x n x (prompt + max_tokens), plus the scored prompts' tokens); this "
                f"server admits at most {self.options.max_queue} sequences and {most} tokens "
                "at once",
            )

    def _fit(self, prompt: np.ndarray, truncate: int | None) -> np.ndarray:
        """The prompt the model sees: its last `truncate` tokens if asked; one longer than
        the context is refused otherwise."""
        if truncate is not None:
            return prompt[-truncate:]
        if len(prompt) > self.limits.context_length:
            raise ApiError(
                400,
                f"a prompt has {len(prompt)} tokens; the model's context is "
                f"{self.limits.context_length} (truncate_prompt_tokens keeps a prompt's last "
                "tokens)",
                param="prompt",
            )
        return prompt

    def start(self, prepared: Prepared, record: RequestRecord) -> Job:
        """A job for the request: from the cache, or queued for the engine."""
        body = prepared.body
        if body.model not in (None, self.info.id, self.info.run_name):
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.info.id!r}",
                param="model",
                code="model_not_found",
            )
        if self.scheduler.check():
            raise ApiError(503, self.scheduler.failure)
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        key = prepared.cache_key
        cached = self.cache.get(key) if key else None
        if key:
            (self.metrics.cache_hits if cached else self.metrics.cache_misses).inc()
        job = Job(self, prepared, record, cached)
        if cached is None:
            try:
                self.scheduler.submit(job.sequences, prepared.scored_tokens)
            except QueueFull as e:
                raise ApiError(
                    429,
                    f"the server is busy ({e}); retry later",
                    kind="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(self.options.retry_after)},
                ) from None
            job.score()
        return job


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A checked request: its body, its prompts' token ids as the model sees them, the
    prompts' own token ids when their log-probabilities are asked (else None), and its
    output-cache key (None: not deterministic)."""

    body: CompletionRequest
    prompts: list[np.ndarray]
    scored: list[np.ndarray] | None
    cache_key: str | None

    @property
    def sequences(self) -> int:
        """The engine's sequences: one per prompt and choice, none without new tokens."""
        return self.body.n * len(self.prompts) if self.body.max_tokens else 0

    @property
    def engine_tokens(self) -> int:
        """The tokens the sequences hold in the engine at most."""
        body = self.body
        return (
            body.n * sum(len(p) + body.max_tokens for p in self.prompts) if body.max_tokens else 0
        )

    @property
    def scored_tokens(self) -> int:
        """The tokens scored: each scored prompt's, once (its n choices share them)."""
        return sum(map(len, self.scored or ()))


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
    """A completion request in flight: its sequences and the scoring of its prompts (or its
    cached answer), and the choices built from what comes back."""

    def __init__(
        self, service: Service, prepared: Prepared, record: RequestRecord, cached: dict | None
    ):
        self.service, self.body, self.record = service, prepared.body, record
        self.prepared, self.cache_key, self.cached = prepared, prepared.cache_key, cached
        record.prompts, record.cached = self.body.prompts, cached is not None
        self.created = int(time.time())
        self.deadline = time.monotonic() + service.options.request_timeout
        self.queue: asyncio.Queue[Piece] = asyncio.Queue()
        generates = not cached and prepared.sequences
        self.sequences = self._sequences(prepared.prompts) if generates else []
        self.scoring: concurrent.futures.Future[list[TextScore]] | None = None
        # Where each choice's generated text starts in its text: after the echoed prompt.
        self.text_offsets = [0] * (self.body.n * len(prepared.prompts))
        self.result: dict | None = None
        if not cached:
            record.prompt_tokens = sum(len(p) for p in prepared.prompts)
            service.metrics.prompt_tokens.inc(record.prompt_tokens)

    def score(self) -> None:
        """Starts scoring the prompts, if asked, on the scorer's thread; their admitted
        tokens are released when it ends (or is cancelled)."""
        if self.prepared.scored is None:
            return
        service, reserved = self.service, self.prepared.scored_tokens
        self.scoring = service.scorer.submit(
            self.prepared.scored, self.body.logprobs, self.deadline
        )
        self.scoring.add_done_callback(lambda _: service.scheduler.release(reserved))

    def _sequences(self, prompts: list[np.ndarray]) -> list[Sequence]:
        body, service = self.body, self.service
        loop = asyncio.get_running_loop()

        def emit(piece: Piece) -> None:  # from the engine thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(self.queue.put_nowait, piece)

        # Choice j of n uses seed + j, so choice 0 is the request with that seed alone.
        seed = secrets.randbelow(protocol.MAX_SEED) if body.seed is None else body.seed
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
                deadline=self.deadline,
                emit=emit,
                token_text=service.token_text,
                keep_logprobs=body.logprobs is not None,
            )
            for i, prompt in enumerate(prompts)
            for j in range(body.n)
        ]

    def cancel(self) -> None:
        self.service.scheduler.cancel(self.sequences)
        if self.scoring is not None:
            self.scoring.cancel()  # unless it has started

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
        choices = [
            {"index": c, "text": "", "logprobs": None, "finish_reason": None}
            for c in range(len(self.text_offsets))
        ]
        if self.body.echo:
            await self._echo(choices)
            yield [dict(choice) for choice in choices]
        left, tokens = len(self.sequences), 0
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

    async def _echo(self, choices: list[dict]) -> None:
        """Puts each prompt's text, and its log-probabilities when asked, at the start of its
        choices (with max_tokens 0, the whole choice)."""
        body, token_text = self.body, self.service.token_text
        scores = None if self.scoring is None else await asyncio.wrap_future(self.scoring)
        for c, choice in enumerate(choices):
            i = c // body.n
            prompt = body.prompts[i]
            text = prompt if isinstance(prompt, str) else self.service.tokenizer.decode(prompt)
            choice["text"], self.text_offsets[c] = text, len(text)
            if scores is not None:
                choice["logprobs"] = protocol.prompt_logprobs_json(
                    token_text,
                    self.prepared.scored[i],
                    scores[i].log_probs,
                    scores[i].top_ids,
                    scores[i].top_log_probs,
                    body.logprobs,
                )
            if not body.max_tokens:
                choice["finish_reason"] = "length"

    def _delta(self, piece: Piece) -> dict:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = protocol.logprobs_json(
                self.service.token_text,
                piece.ids,
                piece.logprobs,
                piece.top_ids,
                piece.top_logprobs,
                [start + self.text_offsets[piece.index] for start in piece.starts],
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
