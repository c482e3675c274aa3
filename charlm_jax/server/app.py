"""The FastAPI app: OpenAI's /v1/completions and /v1/models, vLLM's tokenizer routes, /health,
/ready, /metrics and the playground at /. Every error is OpenAI's error JSON."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from charlm_jax.server import protocol, tokenizer_routes
from charlm_jax.server.protocol import ApiError
from charlm_jax.server.service import Job, RequestRecord, Service

PLAYGROUND = Path(__file__).with_name("playground.html")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection (logs only)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status, headers=error.headers)


def create_app(service: Service) -> FastAPI:
    """The app over `service`; its lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler.start()
        yield
        await asyncio.to_thread(service.scheduler.stop)

    app = FastAPI(
        title="charlm-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(ApiError(exc.status_code, message))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {exc!r}"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        record = RequestRecord(service)
        try:
            body = protocol.parse_request(await request.body(), service.options.max_tokens_limit)
            job = service.start(body, record)
        except ApiError as e:
            record.finish(e.status)
            return error_response(e)
        if body.stream:
            return StreamingResponse(
                _stream(job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await _respond(job, request)

    @app.get("/v1/models")
    async def models() -> dict:
        model = {
            "id": service.info.id,
            "object": "model",
            "created": service.created,
            "owned_by": "charlm-jax",
        }
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        status = service.status
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = prometheus_client.generate_latest(service.metrics.registry)
        return Response(text, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/")
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    tokenizer_routes.add_routes(app, service)
    return app


async def _stream(job: Job) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the usage if asked, then [DONE]. A
    closed connection cancels this generator, which cancels the job's sequences."""
    status = CLIENT_GONE
    try:
        async for deltas in job.deltas():
            yield "".join(protocol.sse(job.chunk([delta])) for delta in deltas)
        options = job.body.stream_options
        if options is not None and options.include_usage:
            yield protocol.sse(job.chunk([], job.result["usage"]))
        yield protocol.sse("[DONE]")
        status = 200
    except ApiError as e:
        status = e.status
        yield protocol.sse(e.to_json())
    finally:
        job.cancel()
        job.record.finish(status)


async def _respond(job: Job, request: Request) -> Response:
    """The whole completion, unless the client goes away first (then its sequences are
    cancelled)."""

    async def collect() -> dict:
        async for _ in job.deltas():
            pass
        return job.result

    collecting = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collecting.done():
            collecting.cancel()
            job.record.finish(CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        result = collecting.result()
    except ApiError as e:
        job.record.finish(e.status)
        return error_response(e)
    finally:
        gone.cancel()
        job.cancel()
    job.record.finish(200)
    return JSONResponse(job.chunk(result["choices"], result["usage"]))


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
