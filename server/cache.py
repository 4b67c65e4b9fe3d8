"""Response cache for deterministic requests only.

A request is deterministic when it is greedy (temperature 0 or top_k 1) or carries
an explicit seed (sampling is deterministic per (seed, step), see model/sampling.py).
The key covers the checkpoint digest (so a rollout never serves another model's text),
the prompt's token ids and every sampling parameter. In-memory LRU with a TTL by
default; Redis when REDIS_URL is set. Redis failures are logged once per outage and
the request is served uncached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedCompletion:
    text: str
    completion_tokens: int
    finish_reason: str


def is_deterministic(params) -> bool:
    return params.temperature == 0 or params.top_k == 1 or params.seed is not None


def cache_key(digest: str, prompt_ids: list[int], params) -> str:
    fields = dataclasses.asdict(params)
    blob = json.dumps({"model": digest, "ids": prompt_ids, "params": fields}, sort_keys=True, default=list)
    return "nanogpt:cache:" + hashlib.sha256(blob.encode()).hexdigest()


class MemoryCache:
    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_entries, self._clock = ttl, max_entries, clock
        self._items: OrderedDict[str, tuple[float, CachedCompletion]] = OrderedDict()

    async def get(self, key: str) -> CachedCompletion | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < self._clock():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    async def set(self, key: str, value: CachedCompletion) -> None:
        self._items[key] = (self._clock() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


class RedisCache:
    def __init__(self, redis, ttl: float, breaker=None):
        self._redis, self.ttl, self._breaker = redis, ttl, breaker

    async def _call(self, fn):
        return await (self._breaker.call(fn) if self._breaker else fn())

    async def get(self, key: str) -> CachedCompletion | None:
        raw = await self._call(lambda: self._redis.get(key))
        if raw is None:
            return None
        try:
            return CachedCompletion(**json.loads(raw))
        except (ValueError, TypeError):
            return None  # written by an incompatible version: a miss

    async def set(self, key: str, value: CachedCompletion) -> None:
        blob = json.dumps(dataclasses.asdict(value))
        await self._call(lambda: self._redis.set(key, blob, px=max(1, int(self.ttl * 1000))))


class ResponseCache:
    """The cache the server talks to: `None` on a miss, on a non-deterministic request, or on a backend failure."""

    def __init__(self, backend, digest: str):
        self._backend = backend
        self.digest = digest
        self._down = False

    @property
    def enabled(self) -> bool:
        return self._backend is not None

    def key_for(self, prompt_ids: list[int], params) -> str | None:
        if self._backend is None or not is_deterministic(params):
            return None
        return cache_key(self.digest, prompt_ids, params)

    def _failed(self, e: Exception) -> None:
        if not self._down:
            log.warning("response cache unavailable; serving uncached", extra={"error": f"{type(e).__name__}: {e}"})
            self._down = True

    def _ok(self) -> None:
        if self._down:
            log.info("response cache is back")
            self._down = False

    async def get(self, key: str) -> CachedCompletion | None:
        try:
            value = await self._backend.get(key)
        except Exception as e:  # Redis down, timeouts, ...: never fail the request
            self._failed(e)
            return None
        self._ok()
        return value

    async def set(self, key: str, value: CachedCompletion) -> None:
        try:
            await self._backend.set(key, value)
        except Exception as e:
            self._failed(e)
        else:
            self._ok()
