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
from dataclasses import dataclass
from typing import AsyncIterator

from model.engine import EngineStopped
from model.engine import Overloaded as EngineOverloaded
from model.engine import PromptTooLong as EnginePromptTooLong
from model.sampling import SamplingParams
from model.tokenizer import TokenizerError

from .cache import CachedCompletion, ResponseCache
from .config import ServerConfig
from .errors import BadRequest, Draining, GenerationTimeout, Overloaded, PromptTooLong, ServerError
from .lifecycle import Lifecycle
from .metrics import Metrics
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)


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

    # ------------------------------------------------------------ input

    def prompt(self, value: str | list[int], field: str) -> Prompt:
        tokenizer = self.lifecycle.engine_or_raise().tokenizer
        if isinstance(value, str):
            try:
                ids = tokenizer.encode(value)
            except TokenizerError as e:
                raise BadRequest(field, str(e)) from None
            if not ids:
                raise BadRequest(field, "encodes to no tokens")
            return Prompt(field, value, ids)
        bad = [t for t in value if t >= tokenizer.n_vocab]
        if bad:
            raise BadRequest(field, f"token id {bad[0]} is out of range; this model has {tokenizer.n_vocab} tokens")
        return Prompt(field, tokenizer.decode(value), list(value))

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
                await self._abandon(handles, identity)
        for i, result in zip(todo, results):
            out[i] = await self._finished(result, identity)
            if keys[i] is not None and result.finish_reason in ("length", "stop", "eos"):
                await self.cache.set(keys[i], CachedCompletion(result.text, result.completion_tokens,
                                                               result.finish_reason))
        return out  # type: ignore[return-value]

    async def _abandon(self, handles: list, identity: str) -> None:
        """Cancel engine requests nobody will read, and still account for what they generated."""
        for h in handles:
            h.cancel()  # harmless for finished requests
        for h in handles:
            with contextlib.suppress(Exception):  # accounting must not mask the original error
                result = await asyncio.wait_for(h.result(), timeout=5)  # the engine frees it next step
                self.metrics.record_result(result)
                await self.limiter.spend_tokens(identity, result.completion_tokens)

    async def _finished(self, result, identity: str) -> Completion:
        self.metrics.record_result(result)
        await self.limiter.spend_tokens(identity, result.completion_tokens)
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
        """`async with gen.stream(...) as s: async for text in s: ...; s.completion`.

        Submits on entry (so Overloaded and friends raise before any response bytes);
        cancels the engine request on exit unless it finished.
        """
        handle = self._submit(prompt, params)
        s = Stream(self, handle, identity)
        try:
            yield s
        finally:
            if not s.accounted:  # the client left, or a timeout, before the engine finished
                await self._abandon([handle], identity)


class Stream:
    """Async iterator of text deltas; `.completion` is set once the engine finishes."""

    def __init__(self, gen: Generator, handle, identity: str):
        self._gen, self._handle, self._identity = gen, handle, identity
        self.completion: Completion | None = None
        self.accounted = False  # the engine's result has been recorded (metrics, token budget)

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self._handle:
            if chunk.text:
                yield chunk.text
        result = await self._handle.result()
        self.accounted = True
        self.completion = await self._gen._finished(result, self._identity)
