"""A circuit breaker for Redis: after a failure, skip Redis for REDIS_RETRY_SECONDS and probe
it in the background; log each transition once.

Without it a hung Redis (SIGSTOPped, a dead node behind a live TCP endpoint) cost every
request one socket timeout per Redis call, five in a row. Callers (rate limits, the
response cache) already fall back to memory or to no cache; the breaker only decides
whether to try Redis at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisSkipped(Exception):
    """The breaker is open: Redis was not tried."""


class RedisBreaker:
    def __init__(self, ping: Callable[[], Awaitable[object]], retry_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._ping, self.retry_s, self._clock = ping, retry_s, clock
        self.open = False
        self.failures = 0  # calls that failed (each one cost a timeout at most)
        self.skipped = 0  # calls not made while open
        self._probe: asyncio.Task | None = None

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """`await fn()` unless the breaker is open (RedisSkipped); a failure opens it."""
        if self.open:
            self.skipped += 1
            raise RedisSkipped("redis skipped after a failure; probing in the background")
        try:
            return await fn()
        except Exception as e:
            self.failures += 1
            self._trip(e)
            raise

    def _trip(self, error: Exception) -> None:
        if self.open:
            return
        self.open = True
        log.warning("redis unavailable; using memory for rate limits and skipping the cache until it answers",
                    extra={"error": f"{type(error).__name__}: {error}", "retry_s": self.retry_s})
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_back(), name="redis-probe")

    async def _probe_until_back(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            try:
                await self._ping()
            except Exception:  # noqa: BLE001 - still down: try again after retry_s
                continue
            self.open = False
            log.info("redis is back", extra={"failures": self.failures, "skipped": self.skipped})
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
