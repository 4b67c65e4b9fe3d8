"""Rate limits per API key (or per client address when there are no keys).

Two limits, both fixed windows aligned to the clock so every replica agrees on
window boundaries: RATE_LIMIT counts requests; TOKEN_BUDGET counts generated tokens
per minute (tokens, not requests, are what cost accelerator time). A request holds its
max_length at admission and gives back what it did not generate when it ends, so that
concurrent requests cannot all start under a budget only one of them fits in.

Counters live in memory (per replica) by default, or in Redis (shared by every
replica) when REDIS_URL is set. If Redis fails, counting falls back to memory and the
outage is logged once, so a Redis hiccup never fails a request.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

from .config import RateLimit
from .errors import RateLimited

log = logging.getLogger(__name__)

TOKEN_WINDOW_S = 60.0


class MemoryCounters:
    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._counts: dict[tuple[str, int], int] = {}

    async def add(self, bucket: str, amount: int, period: float, idx: int | None = None) -> tuple[int, float, int]:
        """Add `amount` to window `idx` (default: the current one) of `bucket`:
        (new total, seconds to the window's end, the window)."""
        now = self._clock()
        idx = int(now // period) if idx is None else idx
        if len(self._counts) > 10_000:  # drop finished windows now and then
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= idx - 1}
        total = self._counts.get((bucket, idx), 0) + amount
        self._counts[(bucket, idx)] = total
        return total, (idx + 1) * period - now, idx


class RedisCounters:
    PREFIX = "nanogpt:rl:"

    def __init__(self, redis, clock: Callable[[], float] = time.time):
        self._redis = redis
        self._clock = clock

    async def add(self, bucket: str, amount: int, period: float, idx: int | None = None) -> tuple[int, float, int]:
        now = self._clock()
        idx = int(now // period) if idx is None else idx
        key = f"{self.PREFIX}{bucket}:{int(period)}:{idx}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, amount)
            pipe.expire(key, math.ceil(period) + 1)
            total, _ = await pipe.execute()
        return int(total), (idx + 1) * period - now, idx


@dataclass
class Reservation:
    """Tokens held for a request at admission (max_length per prompt), settled when it ends."""

    bucket: str
    reserved: int
    window: int
    used: int = 0  # generated tokens, counted as results come in
    settled: bool = False


class RateLimiter:
    def __init__(self, rate: RateLimit | None, token_budget: int | None, redis=None,
                 clock: Callable[[], float] = time.time, breaker=None):
        self.rate = rate
        self.token_budget = token_budget
        self._memory = MemoryCounters(clock)
        self._redis = RedisCounters(redis, clock) if redis is not None else None
        self._redis_down = False
        self._breaker = breaker  # server.breaker.RedisBreaker: skip a failing Redis for a while

    @property
    def enabled(self) -> bool:
        return self.rate is not None or self.token_budget is not None

    async def _add(self, bucket: str, amount: int, period: float, idx: int | None = None) -> tuple[int, float, int]:
        if self._redis is not None:
            try:
                add = lambda: self._redis.add(bucket, amount, period, idx)  # noqa: E731
                result = await (self._breaker.call(add) if self._breaker else add())
            except Exception as e:  # any Redis failure: count locally rather than fail the request
                if not self._redis_down:
                    log.warning("redis unavailable for rate limits; counting in memory",
                                extra={"error": f"{type(e).__name__}: {e}"})
                    self._redis_down = True
            else:
                if self._redis_down:
                    log.info("redis is back for rate limits")
                    self._redis_down = False
                return result
        return await self._memory.add(bucket, amount, period, idx)

    async def check_request(self, identity: str) -> None:
        """Count one request; raise RateLimited past RATE_LIMIT, or when the token budget is spent."""
        if self.rate is not None:
            total, reset_in, _ = await self._add("req:" + identity, 1, self.rate.period_s)
            if total > self.rate.count:
                raise RateLimited(f"rate limit of {self.rate.count} requests per {self.rate.period_s:g} s "
                                  f"exceeded; retry in {math.ceil(reset_in)} s", reset_in)
        if self.token_budget is not None:
            used, reset_in, _ = await self._add("tok:" + identity, 0, TOKEN_WINDOW_S)
            if used >= self.token_budget:
                raise RateLimited(f"token budget of {self.token_budget} generated tokens per minute "
                                  f"spent; retry in {math.ceil(reset_in)} s", reset_in)

    async def reserve_tokens(self, identity: str, n_tokens: int) -> Reservation | None:
        """Hold `n_tokens` (the most the request can generate) in this window's budget, so that
        concurrent requests see each other before they run; refused once the window's
        tokens, spent or held, reach TOKEN_BUDGET. Through Redis, shared by every replica."""
        if self.token_budget is None:
            return None
        bucket = "tok:" + identity
        total, reset_in, window = await self._add(bucket, n_tokens, TOKEN_WINDOW_S)
        if total - n_tokens >= self.token_budget:
            await self._add(bucket, -n_tokens, TOKEN_WINDOW_S, window)
            raise RateLimited(f"token budget of {self.token_budget} generated tokens per minute spent or held "
                              f"by requests in flight; retry in {math.ceil(reset_in)} s", reset_in)
        return Reservation(bucket, n_tokens, window)

    async def settle(self, reservation: Reservation | None) -> None:
        """Give back what the request held but did not generate (once; in the window it was held in)."""
        if reservation is None or reservation.settled:
            return
        reservation.settled = True
        if reservation.used != reservation.reserved:
            await self._add(reservation.bucket, reservation.used - reservation.reserved, TOKEN_WINDOW_S,
                            reservation.window)
