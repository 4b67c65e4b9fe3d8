"""Generation on behalf of both APIs: tokenize, consult the cache, submit to the engine,
await or stream the result, record metrics, charge the token budget.

Handlers call `Generator`; it never touches torch (the engine does). Every engine
request is cancelled in a `finally` unless it finished, so a client that disconnects,
a timeout, or a failed sibling in a batch frees its engine slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

from model.engine import EngineStopped
from model.engine import Overloaded as EngineOverloaded
from model.engine import PromptTooLong as EnginePromptTooLong
from model.engine import TokenChunk
from model.sampling import SamplingParams
from model.tokenizer import TokenizerError

from .admission import FairAdmission, default_rows_per_caller
from .cache import CachedCompletion, ResponseCache
from .config import ServerConfig
from .errors import BadRequest, Draining, GenerationTimeout, Overloaded, PromptTooLong, ServerError
from .lifecycle import Lifecycle
from .metrics import Metrics
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)

# A GPT-2 token is a few bytes on average and rarely more than a few dozen (runs of spaces,
# repeated punctuation): a prompt with more bytes than this per context position cannot fit.
PROMPT_BYTES_PER_POSITION = 32
INLINE_TOKENIZE_CHARS = 2048  # below this, tokenizing costs less than a trip to the pool


@dataclass(frozen=True)
class Prompt:
    field: str  # the request field it came from, for errors ("prompt", "prompts[2]")
    text: str
    ids: list[int]


@dataclass(frozen=True)
class Completion:
    text: str  # the continuation only
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # engine's: length, stop, eos
    cached: bool = False
    token_ids: tuple[int, ...] = ()  # the continuation's tokens (empty when served from the cache)
    logprobs: tuple | None = None  # model.logprobs.TokenLogprob per generated token, when asked for
    prompt_logprobs: tuple | None = None  # ... per prompt token (the first None), when asked for


def _wants_logprobs(params: SamplingParams) -> bool:
    return params.logprobs is not None or params.prompt_logprobs is not None


class Generator:
    def __init__(self, config: ServerConfig, lifecycle: Lifecycle, metrics: Metrics, limiter: RateLimiter,
                 cache: ResponseCache | None):
        self.config, self.lifecycle, self.metrics = config, lifecycle, metrics
        self.limiter, self.cache = limiter, cache
        self._pool: ThreadPoolExecutor | None = None  # tokenizes long prompts off the event loop
        self.admission = FairAdmission(config.max_rows_per_caller or default_rows_per_caller(config.max_batch),
                                       config.max_queue)

    # ------------------------------------------------------------ input

    async def prompt(self, value: str | list[int], field: str) -> Prompt:
        engine = self.lifecycle.engine_or_raise()
        tokenizer = engine.tokenizer
        if isinstance(value, str):
            self._check_bytes(value, field, engine)
            try:
                ids = await self._encode(tokenizer, value)
            except TokenizerError as e:
                raise BadRequest(field, str(e)) from None
            if not ids:
                raise BadRequest(field, "encodes to no tokens")
            return Prompt(field, value, ids)
        bad = [t for t in value if t >= tokenizer.n_vocab]
        if bad:
            raise BadRequest(field, f"token id {bad[0]} is out of range; this model has {tokenizer.n_vocab} tokens")
        return Prompt(field, tokenizer.decode(value), list(value))

    def _check_bytes(self, text: str, field: str, engine) -> None:
        """Refuse a prompt too long to fit by its length alone, before spending CPU on tokenizing it."""
        limit = self.config.max_prompt_bytes or PROMPT_BYTES_PER_POSITION * engine.block_size
        n = len(text.encode("utf-8", "surrogatepass"))
        if n > limit:
            self.metrics.rejected.labels(reason="prompt_too_long").inc()
            raise BadRequest(field, f"prompt is {n} bytes; the limit is {limit} (MAX_PROMPT_BYTES)",
                             code="context_length_exceeded")

    async def _encode(self, tokenizer, text: str) -> list[int]:
        """Short prompts inline; long ones on the tokenizer pool, so that /healthz and other
        streams' tokens do not wait behind them on the event loop."""
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return tokenizer.encode(text)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.tokenizer_threads, thread_name_prefix="tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, tokenizer.encode, text)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _submit(self, prompt: Prompt, params: SamplingParams):
        engine = self.lifecycle.engine_or_raise()
        try:
            return engine.submit(prompt.ids, params)
        except EngineOverloaded as e:
            self.metrics.rejected.labels(reason="overloaded").inc()
            raise Overloaded("engine queue is full; retry later", retry_after=e.retry_after) from None
        except EnginePromptTooLong as e:
            self.metrics.rejected.labels(reason="prompt_too_long").inc()
            raise PromptTooLong(prompt.field, e.n_tokens, e.limit - 1) from None  # e.limit is block_size
        except EngineStopped:
            raise Draining("server is shutting down; retry on another replica", retry_after=1) from None
        except ValueError as e:
            raise BadRequest(prompt.field, str(e)) from None

    # ------------------------------------------------------------ non-streaming

    async def complete(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams],
                       identity: str) -> list[Completion]:
        """Completions for every prompt (with one params, or one per prompt), in order; all engine
        requests run concurrently."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        out: list[Completion | None] = [None] * len(prompts)
        # The cache keeps text only: requests for logprobs always run.
        keys: list[str | None] = [self.cache.key_for(p.ids, q) if self.cache and not _wants_logprobs(q) else None
                                  for p, q in zip(prompts, each)]
        for i, (p, key) in enumerate(zip(prompts, keys)):
            if key is None:
                continue
            hit = await self.cache.get(key)
            if hit is None:
                self.metrics.cache_misses.inc()
                continue
            self.metrics.cache_hits.inc()
            out[i] = Completion(hit.text, len(p.ids), hit.completion_tokens, hit.finish_reason, cached=True)
        todo = [i for i, c in enumerate(out) if c is None]
        if not todo:
            return out  # type: ignore[return-value]
        held = await self.limiter.reserve_tokens(identity, sum(each[i].max_new_tokens for i in todo))
        try:
            async with self.admission.slots(identity, len(todo)):
                results = await self._run(prompts, todo, each, held)
            for result in results:
                self._account(result, held)
        finally:
            await self.limiter.settle(held)
        for i, result in zip(todo, results):
            out[i] = self._completion(result)
            if keys[i] is not None and result.finish_reason in ("length", "stop", "eos"):
                await self.cache.set(keys[i], CachedCompletion(result.text, result.completion_tokens,
                                                               result.finish_reason))
        return out  # type: ignore[return-value]

    async def _run(self, prompts: list[Prompt], todo: list[int], each: list[SamplingParams], held) -> list:
        """Submit every prompt in `todo` and await their engine results."""
        handles: list = []
        results = None
        try:
            for i in todo:  # submit all first: the engine batches them; Overloaded fails fast
                handles.append(self._submit(prompts[i], each[i]))
            try:
                async with asyncio.timeout(self.config.request_timeout):
                    results = await asyncio.gather(*(h.result() for h in handles))
            except TimeoutError:
                raise GenerationTimeout(f"generation exceeded REQUEST_TIMEOUT of {self.config.request_timeout:g} s")
        finally:
            if results is None:  # disconnect, timeout, or a sibling refused: free every slot
                await self._abandon(handles, held)
        return results

    async def _abandon(self, handles: list, held) -> None:
        """Cancel engine requests nobody will read, and still account for what they generated."""
        for h in handles:
            h.cancel()  # harmless for finished requests
        for h in handles:
            with contextlib.suppress(Exception):  # accounting must not mask the original error
                result = await asyncio.wait_for(h.result(), timeout=5)  # the engine frees it next step
                self.metrics.record_result(result)
                if held is not None:
                    held.used += result.completion_tokens

    def _account(self, result, held) -> None:
        self.metrics.record_result(result)
        if held is not None:
            held.used += result.completion_tokens

    def _completion(self, result) -> Completion:
        if result.finish_reason == "error":
            log.error("engine failed a request", extra={"error": result.error})
            raise ServerError("generation failed in the engine")
        if result.finish_reason == "cancelled":  # stopped without drain under us
            raise Draining("server is shutting down; retry on another replica", retry_after=1)
        return Completion(result.text, result.prompt_tokens, result.completion_tokens, result.finish_reason,
                          token_ids=tuple(result.token_ids), logprobs=result.logprobs,
                          prompt_logprobs=result.prompt_logprobs)

    # ------------------------------------------------------------ streaming

    @contextlib.asynccontextmanager
    async def stream(self, prompt: Prompt, params: SamplingParams, identity: str) -> AsyncIterator["Stream"]:
        """`async with gen.stream(...) as s: async for text in s: ...; s.completion` (see streams)."""
        async with self.streams([prompt], [params], identity) as streams:
            yield streams[0]

    @contextlib.asynccontextmanager
    async def streams(self, prompts: list[Prompt], params: list[SamplingParams],
                      identity: str) -> AsyncIterator[list["Stream"]]:
        """One Stream per prompt (with its params), for the choices of one streamed response.

        Submits them all on entry (so Overloaded and friends raise before any response bytes,
        and a refused one cancels those already submitted); cancels on exit every engine
        request that has not finished.
        """
        held = await self.limiter.reserve_tokens(identity, sum(p.max_new_tokens for p in params))
        try:
            async with self.admission.slots(identity, len(prompts)):
                handles: list = []
                try:
                    for prompt, p in zip(prompts, params):
                        handles.append(self._submit(prompt, p))
                    streams = [Stream(self, h, held) for h in handles]
                    handles = []  # the streams own them now
                    try:
                        yield streams
                    finally:
                        left = [s.handle for s in streams if not s.accounted]  # the client left, a timeout
                        if left:
                            await self._abandon(left, held)
                finally:
                    if handles:  # a later submit was refused
                        await self._abandon(handles, held)
        finally:
            await self.limiter.settle(held)


class Stream:
    """One engine request's output as it comes: `chunks()` (TokenChunks, logprobs and all) or
    iterate for the text deltas; `.completion` is set once the engine finishes."""

    def __init__(self, gen: Generator, handle, held):
        self._gen, self.handle, self._held = gen, handle, held
        self.completion: Completion | None = None
        self.accounted = False  # the engine's result has been recorded (metrics, token budget)

    async def chunks(self) -> AsyncIterator[TokenChunk]:
        async for chunk in self.handle:
            yield chunk
        result = await self.handle.result()
        self.accounted = True
        self._gen._account(result, self._held)
        self.completion = self._gen._completion(result)

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self.chunks():
            if chunk.text:
                yield chunk.text


async def interleave(streams: list[Stream]) -> AsyncIterator[tuple[int, TokenChunk | None]]:
    """(i, chunk) for every stream's chunks as they arrive, and (i, None) once stream i has
    finished (its `.completion` is set). An error of any stream is raised here."""
    if len(streams) == 1:
        async for chunk in streams[0].chunks():
            yield 0, chunk
        yield 0, None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def read(i: int, stream: Stream) -> None:
        try:
            async for chunk in stream.chunks():
                queue.put_nowait((i, chunk))
            queue.put_nowait((i, None))
        except Exception as e:  # handed to the reader, who raises it
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(read(i, s)) for i, s in enumerate(streams)]
    ended = 0
    try:
        while ended < len(streams):
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            ended += item is None
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
