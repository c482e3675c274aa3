"""vLLM's tokenizer routes over the served model's tokenizer, for clients that have no
tokenizer file: POST /tokenize, POST /detokenize and GET /tokenizer_info; and the checks of
prompts given as token ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

from charlm_jax.data.tokenizers import BPE_UNK
from charlm_jax.server import protocol
from charlm_jax.server.bodies import read_body
from charlm_jax.server.protocol import ApiError


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # vLLM's; this tokenizer adds none
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    tokens: list[int]


def token_ids(ids: Sequence[int], vocab_size: int, field: str) -> np.ndarray:
    """`ids` as an int32 array; ApiError(400) naming the first id outside the vocabulary."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ApiError(
            400, f"{field}: token id {bad} is outside the vocabulary [0, {vocab_size})", field
        )
    return np.asarray(ids, np.int32)


ROUTE_ERRORS = (400, 401, 408, 413, 415)  # a bad body or key; no engine work


def add_routes(app: FastAPI, service) -> None:
    """Adds the three routes over `service` (a server.service.Service) to `app`."""
    tokenizer = service.tokenizer

    @app.post("/tokenize", **protocol.body_openapi(TokenizeRequest, errors=ROUTE_ERRORS))
    async def tokenize(request: Request) -> dict:
        body = protocol.parse_json(await read_body(request, service), TokenizeRequest)
        ids = service.encode(body.prompt).tolist() if body.prompt else []
        return {
            "count": len(ids),
            "max_model_len": service.scheduler.engine.context_length,
            "tokens": ids,
            "token_strs": [service.token_text[i] for i in ids] if body.return_token_strs else None,
        }

    @app.post("/detokenize", **protocol.body_openapi(DetokenizeRequest, errors=ROUTE_ERRORS))
    async def detokenize(request: Request) -> dict:
        body = protocol.parse_json(await read_body(request, service), DetokenizeRequest)
        return {"prompt": tokenizer.decode(token_ids(body.tokens, tokenizer.vocab_size, "tokens"))}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        unk = tokenizer.unk_id if tokenizer.allow_unknown else None
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",  # hf_tokenizer.py's form of it
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "model_max_length": service.scheduler.engine.context_length,
            "unk_token": None if unk is None else BPE_UNK,
            "unk_token_id": unk,
            "bos_token": None,
            "eos_token": None,
            "pad_token": None,
        }
