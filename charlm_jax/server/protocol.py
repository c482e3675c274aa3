"""The OpenAI completions API as this server speaks it: request fields, their checks, and
the JSON of responses, stream chunks and errors."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per request
MAX_STOPS = 4  # as OpenAI's
MAX_LOGPROBS = 5  # the engine's TOP_LOGPROBS
MAX_SEED = 2**31 - 1
MAX_TEMPERATURE = 2.0  # as OpenAI's
# Below this, top_p keeps only the most likely token whatever the distribution: greedy in
# effect, while tinier values round to 0 in float32 and would turn filtering off.
MIN_TOP_P = 1e-6
MAX_JSON_DEPTH = 4  # the deepest valid body: {"stream_options": {...}} or {"prompt": [...]}
MAX_JSON_KEYS = 64  # per object; the request has fewer fields
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


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of this server: the model's bounds and the operator's."""

    vocab_size: int
    context_length: int  # longer prompts are refused unless truncated
    max_tokens: int = 2048
    max_prompt_chars: int = 1 << 16  # per prompt, checked before tokenizing
    max_echo_chars: int = 1 << 20  # prompt characters x n (x (1 + logprobs)) echoed back


# The bounds of the numeric fields, checked in this order (the first bad field is named):
# (lowest, highest), inclusive; a string names a `Limits` attribute. Add a field here.
RANGES: dict[str, tuple[float | str, float | str]] = {
    "max_tokens": (0, "max_tokens"),  # 0 only with echo: `parse_request`
    "temperature": (0.0, MAX_TEMPERATURE),
    "top_p": (MIN_TOP_P, 1.0),
    "top_k": (0, "vocab_size"),
    "n": (1, MAX_N),
    "logprobs": (0, MAX_LOGPROBS),
    "seed": (0, MAX_SEED),
    "truncate_prompt_tokens": (1, "context_length"),
}
# The characters of each string of a text field: (fewest, most), as in RANGES.
TEXT_LENGTHS: dict[str, tuple[int | str, int | str]] = {
    "prompt": (0, "max_prompt_chars"),
    "stop": (1, MAX_STOP_LENGTH),
}


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
    """The body of POST /v1/completions (value bounds: `RANGES` and `TEXT_LENGTHS`)."""

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
    n: int = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = None
    # vLLM's: keep a prompt's last this many tokens (without it a prompt longer than the
    # context is refused)
    truncate_prompt_tokens: int | None = None
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
    def scores_prompts(self) -> bool:
        """Whether the prompts' own log-probabilities are asked for (echo with logprobs)."""
        return self.echo and self.logprobs is not None

    @property
    def deterministic(self) -> bool:
        """Whether the output depends only on the request (so it may be cached)."""
        return self.temperature == 0 or self.seed is not None or self.max_tokens == 0

    def cache_key(self, model_id: str, step: int, quantize: str) -> str:
        """A digest of everything that changes the output (not a copy of the prompts)."""
        sampling = self.model_dump(exclude={"model", "stream", "stream_options", "user"})
        text = json.dumps([model_id, step, quantize, sampling], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def parse_json(body: bytes, model: type[Body]) -> Body:
    """`body` as a `model`; ApiError(400) naming the first bad field (malformed, too deep or
    too wide JSON too: `load_json`)."""
    data = load_json(body)
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        errors = e.errors()  # a union lists each member's error: the first not about type
        error = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        where = ".".join(str(part) for part in error["loc"][:2] if not _is_type_tag(part))
        raise ApiError(400, f"{where}: {error['msg']}", param=where.split(".")[0]) from None


def parse_request(body: bytes, limits: Limits) -> CompletionRequest:
    """The checked request; ApiError(400) naming the first bad field."""
    request = parse_json(body, CompletionRequest)
    _fill_defaults(request)
    for name, neutral in NEUTRAL.items():
        if getattr(request, name) not in (None, neutral):
            raise ApiError(400, f"{name} is not supported (only {neutral!r})", param=name)
    _check_ranges(request, limits)
    _check_texts(request, limits)
    if request.max_tokens == 0 and not request.echo:
        raise ApiError(400, "max_tokens must be >= 1 unless echo is set", param="max_tokens")
    # Each echoed character comes back once, or with its log-probability and alternatives.
    per_char = 1 + request.logprobs if request.scores_prompts else 1
    echoed = sum(map(len, request.prompts)) * request.n * per_char if request.echo else 0
    if echoed > limits.max_echo_chars:
        raise ApiError(
            400,
            f"echo would send back {echoed} prompt characters (n copies of each prompt, "
            f"x (1 + logprobs) with log-probabilities); the most is {limits.max_echo_chars}",
            param="echo",
        )
    return request


def load_json(body: bytes) -> Any:
    """The JSON value of `body`; ApiError(400) if it is malformed, nests deeper than
    MAX_JSON_DEPTH or has an object of more than MAX_JSON_KEYS keys."""
    try:
        data = json.loads(body, object_pairs_hook=_object, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def _object(pairs: list[tuple[str, Any]]) -> dict:
    if len(pairs) > MAX_JSON_KEYS:
        raise ValueError(f"an object has {len(pairs)} keys; the most is {MAX_JSON_KEYS}")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        return 0
    return 1 + max(map(_depth, value), default=0)


def _check_ranges(request: CompletionRequest, limits: Limits) -> None:
    for name, bounds in RANGES.items():
        value = getattr(request, name)
        low, high = (getattr(limits, x) if isinstance(x, str) else x for x in bounds)
        if value is not None and not low <= value <= high:  # NaN and inf fail too
            raise ApiError(400, f"{name} must be in [{low}, {high}], got {value}", param=name)


def _check_texts(request: CompletionRequest, limits: Limits) -> None:
    for name, bounds in TEXT_LENGTHS.items():
        low, high = (getattr(limits, x) if isinstance(x, str) else x for x in bounds)
        value = getattr(request, name)
        if name == "prompt":  # a string, token ids, or a list of either
            value = request.prompts
        for text in [value] if isinstance(value, str) else value or ():
            if not low <= len(text) <= high:
                raise ApiError(
                    400,
                    f"each {name} must have {low} to {high} characters, got {len(text)}",
                    param=name,
                )


def _is_type_tag(part) -> bool:
    # pydantic names the union member that failed ("str", "list[str]") after the field
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _fill_defaults(request: CompletionRequest) -> None:
    # OpenAI clients send null for "the default"
    defaults = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    for name, value in defaults.items():
        if getattr(request, name) is None:
            setattr(request, name, value)


def _request_schema(model: type[Body]) -> dict:
    """A request body's JSON schema for the OpenAPI document: pydantic's, with the fixed
    bounds of RANGES, and its `$defs` references inlined."""
    schema = model.model_json_schema()
    for name, (low, high) in RANGES.items():
        if name not in schema["properties"]:
            continue
        if not isinstance(low, str):
            schema["properties"][name]["minimum"] = low
        if not isinstance(high, str):
            schema["properties"][name]["maximum"] = high
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            return (
                inline(defs[ref.split("/")[-1]]) if ref else {k: inline(v) for k, v in node.items()}
            )
        return [inline(x) for x in node] if isinstance(node, list) else node

    return inline(schema)


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERRORS = {
    400: "an invalid request, or one that can never fit",
    401: "no valid API key",
    404: "an unknown model",
    408: "the body arrived too slowly",
    413: "the body is too large",
    415: "the body is not JSON",
    429: "busy: retry after Retry-After seconds",
    500: "the model failed on this request",
    503: "the engine failed, or the server is shutting down",
    504: "past the request timeout",
}


def body_openapi(model: type[Body], answer: str = "the result", errors=tuple(_ERRORS)) -> dict:
    """The OpenAPI description of a POST route that reads its `model` body itself: the
    body's schema, its answer and the error statuses it may give."""
    return {
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _request_schema(model)}},
            }
        },
        "responses": {
            200: {"description": answer},
            **{
                status: {
                    "description": _ERRORS[status],
                    "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                }
                for status in errors
            },
        },
    }


COMPLETIONS_OPENAPI = body_openapi(
    CompletionRequest, "the completion, or server-sent events of its chunks"
)


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


def prompt_logprobs_json(
    token_text: list[str], ids, logprobs, top_ids, top_logprobs, k: int
) -> dict:
    """OpenAI's `logprobs` object of an echoed prompt, as `logprobs_json` but for its first
    token, whose log-probability and alternatives are null (nothing comes before it); with
    `k` 0, `top_ids` and `top_logprobs` may be None."""
    if not len(ids):
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    starts = list(itertools.accumulate((len(token_text[i]) for i in ids[:-1]), initial=0))
    if top_ids is None:
        top_ids = top_logprobs = [[]] * len(logprobs)
    rest = logprobs_json(token_text, ids[1:], logprobs, top_ids, top_logprobs, starts[1:], k)
    return {
        "tokens": [token_text[ids[0]], *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": starts,
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
