"""Server-Sent Events: `data: <json>\\n\\n` frames, ending with `data: [DONE]` as OpenAI's API does."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from aiohttp import web

from .errors import GenerationTimeout, ServerError, error_body


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    return response


async def send(response: web.StreamResponse, data: dict) -> None:
    await response.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")


async def pump(response: web.StreamResponse, events: AsyncIterator[dict], timeout: float) -> bool:
    """Send every event; True if they all went out. After the headers an error can only be
    an event: a timeout or a ServerError is sent as {"error": {...}} and gives False.
    ConnectionResetError (the client left) propagates to the caller."""
    try:
        async with asyncio.timeout(timeout):
            async for event in events:
                await send(response, event)
        return True
    except TimeoutError:
        await send(response, error_body(GenerationTimeout("generation exceeded REQUEST_TIMEOUT")))
    except ServerError as err:
        await send(response, error_body(err))
    return False


async def done(response: web.StreamResponse) -> None:
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
