"""A streamed response of several choices (one or more prompts, `n` samples each) over SSE:
the choices' engine streams interleaved as their chunks arrive, each event naming its
choice's `index`; each choice's last event carries its finish_reason; then, if asked, one
usage event (empty choices), then `[DONE]`. The API's own shapes come from a `ChoiceEvents`
(server/api_openai.py for completions, server/api_chat.py for chat).
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Protocol

from aiohttp import web

from model.engine import TokenChunk

from . import keys, sse
from .serving import Completion, Stream, interleave


class ChoiceEvents(Protocol):
    """What one API streams for its choices; None: nothing to send for this one."""

    def opening(self, index: int) -> dict | None: ...

    def delta(self, index: int, chunk: TokenChunk) -> dict | None: ...

    def ending(self, index: int, completion: Completion) -> dict: ...

    def usage(self, completions: list[Completion]) -> dict: ...


async def stream_choices(request: web.Request, streams: list[Stream], events: ChoiceEvents,
                         include_usage: bool) -> web.StreamResponse:
    """Send every choice's events (call inside Generator.streams); the response, ended."""

    async def all_events() -> AsyncIterator[dict]:
        for i in range(len(streams)):
            if (event := events.opening(i)) is not None:
                yield event
        async with contextlib.aclosing(interleave(streams)) as chunks:
            async for i, chunk in chunks:
                event = events.ending(i, streams[i].completion) if chunk is None else events.delta(i, chunk)
                if event is not None:
                    yield event

    response = await sse.open_stream(request)
    async with contextlib.aclosing(all_events()) as out:
        sent = await sse.pump(response, out, request.app[keys.CONFIG].request_timeout)
    if sent:
        completions = [s.completion for s in streams]
        request[keys.ACCESS]["completion_tokens"] = sum(c.completion_tokens for c in completions)
        if include_usage:
            await sse.send(response, events.usage(completions))
    await sse.done(response)
    return response
