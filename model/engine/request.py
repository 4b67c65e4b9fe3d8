"""What a request looks like from outside the engine: its outputs (TokenChunk,
GenerationResult), the engine's stats, and the asyncio side of a request (`RequestHandle`,
fed by the worker thread through an `Outbox`). Nothing here schedules or runs the model.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    max_batch: int
    kv_cache_bytes: int
    kv_cache_usage: float  # occupied positions / all positions, 0..1
    tokens_per_second: float  # recent decode throughput (all rows together)
    total_steps: int
    last_batch_size: int
    block_size: int = 0  # positions per cache row (the model's context length); 0 when unknown


@dataclass(frozen=True)
class TokenChunk:
    token_ids: list[int]
    text: str  # newly completed text; never contains (part of) a stop string
    # Only for requests that asked (SamplingParams.logprobs / .prompt_logprobs): a TokenLogprob per
    # token in token_ids, and on the first chunk the prompt's (the first None), as in GenerationResult.
    logprobs: tuple | None = None
    prompt_logprobs: tuple | None = None

    def merge(self, more: "TokenChunk") -> "TokenChunk":
        """This chunk followed by `more`, as one."""
        logprobs = self.logprobs if more.logprobs is None else (self.logprobs or ()) + more.logprobs
        return TokenChunk(self.token_ids + more.token_ids, self.text + more.text, logprobs,
                          self.prompt_logprobs if self.prompt_logprobs is not None else more.prompt_logprobs)


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    text: str  # the continuation only, cut before a stop string
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # length | stop | eos | cancelled | error
    queue_s: float
    ttft_s: float | None
    total_s: float
    error: str | None = None
    logprobs: tuple | None = None  # model.logprobs.TokenLogprob per generated token (params.logprobs)
    prompt_logprobs: tuple | None = None  # ... per prompt token, the first None (params.prompt_logprobs)


class Canceller(Protocol):
    """What a RequestHandle needs of its engine: a way to cancel it (Engine.cancel)."""

    def cancel(self, handle: "RequestHandle") -> None: ...


class RequestHandle:
    """One request, seen from asyncio: iterate for TokenChunks, await result(), cancel()."""

    def __init__(self, engine: Canceller, loop: asyncio.AbstractEventLoop):
        self._engine, self._loop = engine, loop
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._result: asyncio.Future = loop.create_future()
        self._ended = False  # the end-of-stream mark has been read
        self.cancelled = False  # set by Engine.cancel, read by the worker thread
        self.rid = -1  # the request's id between processes (model/engine/client.py)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this request's chunks and result are delivered on."""
        return self._loop

    def cancel(self) -> None:
        """Free the slot at the next engine step; idempotent, harmless after the end."""
        self._engine.cancel(self)

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenChunk:
        """The next chunk, merged with every other chunk that has already arrived: a reader
        that falls behind the engine (a busy event loop, a slow client) catches up in one
        write rather than one per token, so serving many streams cannot snowball."""
        if self._ended:
            raise StopAsyncIteration
        chunk = await self._chunks.get()
        while chunk is not None and not self._chunks.empty():
            more = self._chunks.get_nowait()
            if more is None:
                self._ended = True
                break
            chunk = chunk.merge(more)
        if chunk is None:
            self._ended = True
            raise StopAsyncIteration
        return chunk

    async def result(self) -> GenerationResult:
        return await asyncio.shield(self._result)

    def deliver(self, chunk: TokenChunk | None, result: GenerationResult | None) -> None:
        """Called on the event loop's thread (Outbox.send): queue a chunk, and with the result the end."""
        if chunk is not None:
            self._chunks.put_nowait(chunk)
        if result is not None:
            self._chunks.put_nowait(None)
            if not self._result.done():
                self._result.set_result(result)


class Outbox:
    """Deliveries collected during a step, sent with one call_soon_threadsafe per event loop."""

    def __init__(self):
        self._by_loop: dict = collections.defaultdict(list)

    def put(self, handle: RequestHandle, chunk: TokenChunk | None, result: GenerationResult | None = None):
        self._by_loop[handle.loop].append((handle, chunk, result))

    def send(self) -> None:
        for loop, items in self._by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver_all(items) -> None:
    for handle, chunk, result in items:
        handle.deliver(chunk, result)
