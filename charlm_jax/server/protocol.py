"""The OpenAI completions API as this server speaks it: request fields, their checks, and
the JSON of responses, stream chunks and errors."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from charlm_jax.decoding.engine import check_sampling_args

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per request
MAX_STOPS = 4  # as OpenAI's
MAX_LOGPROBS = 5  # the engine's TOP_LOGPROBS
MAX_SEED = 2**31 - 1
MAX_STOP_LENGTH = 256
# OpenAI fields this server does not implement, accepted at these (neutral) values
NEUTRAL = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "best_of": 1,
    "logit_bias": {},
    "suffix": "",
}
Body = TypeVar("Body", bound=BaseModel)


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "",
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def to_json(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None  # None: the served model
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[int], Field(min_length=1)]  # token ids
        | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = 0  # an extra field, as vLLM's
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    user: str | None = None
    presence_penalty: float | None = None  # OpenAI's, at their neutral values only
    frequency_penalty: float | None = None
    best_of: int | None = None
    logit_bias: dict | None = None
    suffix: str | None = None

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or token ids."""
        single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if single else self.prompt

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def deterministic(self) -> bool:
        """Whether the output depends only on the request (so it may be cached)."""
        return self.temperature == 0 or self.seed is not None

    def cache_key(self, model_id: str, step: int, quantize: str) -> str:
        sampling = self.model_dump(exclude={"model", "stream", "stream_options", "user"})
        return json.dumps([model_id, step, quantize, sampling], sort_keys=True)


def parse_json(body: bytes, model: type[Body]) -> Body:
    """`body` as a `model`; ApiError(400) naming the first bad field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        errors = e.errors()  # a union lists each member's error: the first not about type
        error = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        where = ".".join(str(part) for part in error["loc"][:2] if not _is_type_tag(part))
        raise ApiError(400, f"{where}: {error['msg']}", param=where.split(".")[0]) from None


def parse_request(body: bytes, max_tokens_limit: int) -> CompletionRequest:
    """The checked request; ApiError(400) naming the first bad field."""
    request = parse_json(body, CompletionRequest)
    _fill_defaults(request)
    for name, neutral in NEUTRAL.items():
        if getattr(request, name) not in (None, neutral):
            raise ApiError(400, f"{name} is not supported (only {neutral!r})", param=name)
    if not 1 <= request.max_tokens <= max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens must be in [1, {max_tokens_limit}], got {request.max_tokens}",
            param="max_tokens",
        )
    try:
        check_sampling_args(request.temperature, request.top_k, request.top_p, 1)
    except ValueError as e:  # the message starts with the field's name
        raise ApiError(400, str(e), param=str(e).split()[0]) from None
    for stop in request.stops:
        if not 0 < len(stop) <= MAX_STOP_LENGTH:
            raise ApiError(
                400,
                f"each stop must have 1 to {MAX_STOP_LENGTH} characters, got {stop!r}",
                param="stop",
            )
    if request.echo and request.logprobs is not None:
        raise ApiError(
            400, "echo with logprobs (prompt log-probabilities) is not supported", param="logprobs"
        )
    return request


def _is_type_tag(part) -> bool:
    # pydantic names the union member that failed ("str", "list[str]") after the field
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _fill_defaults(request: CompletionRequest) -> None:
    # OpenAI clients send null for "the default"
    defaults = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    for name, value in defaults.items():
        if getattr(request, name) is None:
            setattr(request, name, value)


def logprobs_json(
    token_text: list[str], ids, logprobs, top_ids, top_logprobs, starts: list[int], k: int
) -> dict:
    """OpenAI's `logprobs` object for some tokens: their text, log-probs, the `k` most
    likely alternatives of each, and where each starts in the choice's text."""
    return {
        "tokens": [token_text[i] for i in ids],
        "token_logprobs": [float(x) for x in logprobs],
        "top_logprobs": [
            {token_text[j]: float(x) for j, x in zip(row_ids[:k], row_lps[:k], strict=True)}
            for row_ids, row_lps in zip(top_ids, top_logprobs, strict=True)
        ],
        "text_offset": list(starts),
    }


def completion_json(
    request_id: str, created: int, model: str, choices: list[dict], usage: dict | None
) -> dict:
    """A completion (choices with `text`, `index`, `logprobs`, `finish_reason`), or one
    stream chunk of one (then `usage` is None but in the last chunk)."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: Any) -> str:
    """One server-sent event carrying `data` (JSON, or the literal [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
