"""The engine's public data: configuration, errors, stats, results, and the asyncio side of
a request (`RequestHandle`, fed by the worker thread through an `Outbox`).

Everything here is importable from `model.engine` too; this module holds no scheduling.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.engine import Engine


# --- errors -----------------------------------------------------------------

class EngineError(Exception):
    """Base class of the engine's errors."""


class Overloaded(EngineError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"engine overloaded, retry after {retry_after:.1f}s")
        self.retry_after = retry_after


class PromptTooLong(EngineError, ValueError):
    """The prompt does not leave room for one new token in the model's context."""

    def __init__(self, n_tokens: int, limit: int):
        super().__init__(f"prompt has {n_tokens} tokens; the limit is {limit - 1} (block_size {limit})")
        self.n_tokens, self.limit = n_tokens, limit


class EngineStopped(EngineError):
    """The engine is draining or stopped and takes no new requests."""


# --- public data ------------------------------------------------------------

CPU_LINEAR_CHOICES = ("auto", "kernel", "out_in", "in_out")  # see model/fastpath.choose_cpu_linear
CPU_ATTENTION_CHOICES = ("auto", "kernel", "torch")  # see model/fastpath.choose_cpu_attention


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # cache rows = sequences decoded together
    max_queue: int = 256  # waiting requests beyond this are rejected with Overloaded
    prefill_chunk: int = 128  # prompt tokens prefilled per step, so a long prompt cannot stall decode
    # ... while some row is decoding (times the rows waiting on their prompts per decoding row,
    # when they outnumber it). With none decoding there is nobody to stall, and a burst of
    # prompts prefills in a few big forwards of up to this many tokens instead of many small ones.
    idle_prefill_chunk: int = 2048
    cuda_graphs: bool = True  # capture the decode step per batch bucket (CUDA only)
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    seed: int | None = None  # seeds the engine's RNG that gives unseeded requests their seed
    # What runs nn.Linear on CPU: "kernel" (model/cpukernels.py), torch's F.linear on
    # "out_in" (nn.Linear's) or "in_out" weights, or "auto": time them at start.
    cpu_linear: str = "auto"
    # What runs one-token attention on CPU: "kernel" (fused, model/cpukernels.py), "torch",
    # or "auto" (the kernel where it builds).
    cpu_attention: str = "auto"
    # Batch-invariant mode (CPU): every matrix product and every attention, prompt chunks
    # included, runs on model/cpukernels.py's kernels, which compute each token in one order
    # whatever else is in the step, so a request's logits have the same bits alone, in any
    # batch and under any chunking. Off: that holds for decode batches up to the kernel's
    # measured row limit; prefill goes to torch's faster GEMMs (AMX in half precision).
    batch_invariant: bool = False
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # CUDA-graph batch sizes

    def validate(self) -> "EngineConfig":
        for name in ("max_batch", "max_queue", "prefill_chunk", "idle_prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.cpu_linear not in CPU_LINEAR_CHOICES:
            raise ValueError(f"cpu_linear must be one of {', '.join(CPU_LINEAR_CHOICES)}, got {self.cpu_linear!r}")
        if self.cpu_attention not in CPU_ATTENTION_CHOICES:
            raise ValueError(f"cpu_attention must be one of {', '.join(CPU_ATTENTION_CHOICES)}, "
                             f"got {self.cpu_attention!r}")
        return self


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


class RequestHandle:
    """One request, seen from asyncio: iterate for TokenChunks, await result(), cancel()."""

    def __init__(self, engine: "Engine", loop: asyncio.AbstractEventLoop):
        self._engine, self._loop = engine, loop
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._result: asyncio.Future = loop.create_future()
        self._ended = False  # the end-of-stream mark has been read
        self.cancelled = False  # read by the worker thread

    def cancel(self) -> None:
        """Free the slot at the next engine step; idempotent, harmless after the end."""
        self.cancelled = True
        self._engine._wake()

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
            chunk = TokenChunk(chunk.token_ids + more.token_ids, chunk.text + more.text)
        if chunk is None:
            self._ended = True
            raise StopAsyncIteration
        return chunk

    async def result(self) -> GenerationResult:
        return await asyncio.shield(self._result)

    # called on the event loop thread, via call_soon_threadsafe
    def _deliver(self, chunk: TokenChunk | None, result: GenerationResult | None) -> None:
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
        self._by_loop[handle._loop].append((handle, chunk, result))

    def send(self) -> None:
        for loop, items in self._by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver_all(items) -> None:
    for handle, chunk, result in items:
        handle._deliver(chunk, result)
