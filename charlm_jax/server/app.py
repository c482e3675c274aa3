"""The FastAPI app: OpenAI's /v1/completions and /v1/models, vLLM's tokenizer routes, /health,
/ready, /metrics and the playground at /. Every error is OpenAI's error JSON. `server_config`
gives uvicorn the connection limits and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

import prometheus_client
import uvicorn
from absl import logging
from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from charlm_jax.server import protocol, tokenizer_routes
from charlm_jax.server.bodies import read_body
from charlm_jax.server.protocol import ApiError
from charlm_jax.server.service import Job, RequestRecord, Service

PLAYGROUND = Path(__file__).with_name("playground.html")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection (logs only)
WATCHDOG_PERIOD = 0.25  # seconds between the watchdog's looks at the engine thread
OPEN_PATHS = ("/health",)  # answered without the API key (load balancers' probes)
UNAVAILABLE = {503: {"description": "the engine failed (or, for /ready: not ready yet)"}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status, headers=error.headers)


def create_app(service: Service) -> FastAPI:
    """The app over `service`; its lifespan starts and stops the engine thread and runs
    the watchdog."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler.start()
        watchdog = asyncio.ensure_future(_watch(service))
        yield
        watchdog.cancel()
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="charlm-jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, service=service)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names one route's methods, not the path's
            headers = {"Allow": ", ".join(_methods_at(app, request.scope))}
        return error_response(ApiError(exc.status_code, message, headers=headers))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {exc!r}"))

    @app.post("/v1/completions", **protocol.COMPLETIONS_OPENAPI)
    async def completions(request: Request) -> Response:
        record = RequestRecord(service)
        try:
            body = await read_body(request, service)
            prepared = await asyncio.to_thread(service.prepare, body)  # grows with the body
            job = service.start(prepared, record)
        except ApiError as e:
            record.finish(e.status)
            return error_response(e)
        if prepared.body.stream:
            return EventStream(_stream(job), service.options.send_timeout, job.record)
        return await _respond(job, request)

    @app.get("/v1/models")
    async def models() -> dict:
        model = {
            "id": service.info.id,
            "object": "model",
            "created": service.created,
            "owned_by": "charlm-jax",
            "decode_dots": service.decode_dots,  # set by the engine's warm-up
        }
        return {"object": "list", "data": [model]}

    @app.get("/health", responses=UNAVAILABLE)
    @app.head("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        failure = service.scheduler.check()
        body = {"status": "failed", "error": failure} if failure else {"status": "ok"}
        return JSONResponse(body, status_code=503 if failure else 200)

    @app.get("/ready", responses=UNAVAILABLE)
    @app.head("/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        status = service.status
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        text = prometheus_client.generate_latest(service.metrics.registry)
        return Response(text, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    tokenizer_routes.add_routes(app, service)
    return app


class Guard:
    """ASGI middleware: the Host allow-list and the API key (every path but OPEN_PATHS
    needs `Authorization: Bearer KEY`, compared in constant time)."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (error := self._refusal(scope)):
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> ApiError | None:
        options = self.service.options
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        host = headers.get("host", b"").decode("latin-1").rsplit(":", 1)[0].strip("[]")
        if options.allowed_hosts and host not in options.allowed_hosts:
            return ApiError(400, f"host {host!r} is not allowed", code="host_not_allowed")
        if options.api_key is None or scope["path"] in OPEN_PATHS:
            return None
        given = headers.get("authorization", b"")
        if not hmac.compare_digest(given, b"Bearer " + options.api_key.encode()):
            return ApiError(
                401,
                "a valid API key is required (Authorization: Bearer KEY)",
                kind="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None


class EventStream(StreamingResponse):
    """Server-sent events whose every send must complete within `timeout` seconds: a client
    that stops reading is dropped (and its sequences cancelled) instead of holding them."""

    def __init__(self, events: AsyncIterator[str], timeout: float, record: RequestRecord):
        super().__init__(events, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self.timeout, self.record = timeout, record

    async def stream_response(self, send: Send) -> None:
        async def timed_send(message) -> None:
            await asyncio.wait_for(send(message), self.timeout)

        try:
            await super().stream_response(timed_send)
        except asyncio.TimeoutError:
            logging.warning(
                "request %s: its client read nothing for %gs; dropped", self.record.id, self.timeout
            )
        finally:
            await self.body_iterator.aclose()  # its `finally` cancels the job's sequences


def _methods_at(app: FastAPI, scope: Scope) -> list[str]:
    """The methods that the routes at the request's path answer."""
    methods = set()
    for route in app.routes:
        if route.matches(scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", set())
    return sorted(methods)


async def _watch(service: Service) -> None:
    while True:
        service.scheduler.check()
        await asyncio.sleep(WATCHDOG_PERIOD)


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


def server_config(
    service: Service,
    host: str,
    port: int,
    max_connections: int = 256,
    header_timeout: float = 10.0,
    **kwargs,
) -> uvicorn.Config:
    """Uvicorn's config for the app: at most `max_connections` open connections (more get
    503), and a connection that has not sent its request's headers within
    `header_timeout` seconds is closed (half-sent requests cannot pile up)."""
    return uvicorn.Config(
        create_app(service),
        host=host,
        port=port,
        http=_headers_within(header_timeout),
        limit_concurrency=max_connections,
        **kwargs,
    )


def _headers_within(timeout: float) -> type:
    class Protocol(AutoHTTPProtocol):
        """Uvicorn's HTTP protocol, closing a connection whose first request's headers are
        not complete `timeout` seconds after it opened."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._headers_timer = self.loop.call_later(timeout, self._headers_late)

        def _headers_late(self) -> None:
            if self.cycle is None:
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._headers_timer.cancel()
            super().connection_lost(exc)

    return Protocol
