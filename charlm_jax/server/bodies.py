"""Reading a request's JSON body within the server's limits: its media type, its size (checked
while it arrives, never buffered whole) and its time."""

from __future__ import annotations

import asyncio

from fastapi import Request

from charlm_jax.server.protocol import ApiError


async def read_body(request: Request, service) -> bytes:
    """The JSON body of `request` under `service.options`' limits, read as it comes: 415
    unless it says it is JSON, 413 once it passes `max_body_bytes` (before the rest is read),
    408 if it takes over `body_timeout`."""
    options = service.options
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "the body must be JSON (Content-Type: application/json)")
    too_large = ApiError(
        413,
        f"the body is larger than {options.max_body_bytes} bytes",
        headers={"Connection": "close"},  # its rest is never read
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > options.max_body_bytes:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > options.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), options.body_timeout)
    except asyncio.TimeoutError:
        raise ApiError(
            408,
            f"the body took longer than {options.body_timeout:g}s to arrive",
            headers={"Connection": "close"},
        ) from None
