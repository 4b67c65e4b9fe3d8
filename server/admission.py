"""Fair admission in front of the engine: one caller (an API key, or a client address) may
hold at most MAX_ROWS_PER_CALLER engine requests at once; past that its requests wait
here, and freed room goes to waiting callers in turn (round robin), so a caller with a
256-prompt batch cannot starve an 8-token request behind it.

The engine's own queue is first come, first served and cannot preempt a running row; the
default cap leaves an eighth of MAX_BATCH (at least one row) for other callers, so a newcomer
finds a free row even while one caller's long requests fill the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from .errors import Overloaded


def default_rows_per_caller(max_batch: int) -> int:
    return max(1, max_batch - max(1, max_batch // 8)) if max_batch > 1 else 1


@dataclass
class _Waiter:
    n: int
    future: asyncio.Future = field(repr=False)


class FairAdmission:
    def __init__(self, per_caller: int, max_waiting: int):
        self.per_caller = per_caller  # engine requests one caller may hold at once
        self.max_waiting = max_waiting  # requests waiting here, all callers together
        self.held: dict[str, int] = {}
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # callers in turn order

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _fits(self, caller: str, n: int) -> bool:
        held = self.held.get(caller, 0)
        return held == 0 or held + n <= self.per_caller  # a request larger than the cap runs alone

    @contextlib.asynccontextmanager
    async def slots(self, caller: str, n: int) -> AsyncIterator[None]:
        """Hold `n` engine requests for `caller` while the block runs; waits its turn past the cap."""
        await self._acquire(caller, n)
        try:
            yield
        finally:
            self._release(caller, n)

    async def _acquire(self, caller: str, n: int) -> None:
        if caller not in self._queues and self._fits(caller, n):
            self.held[caller] = self.held.get(caller, 0) + n
            return
        if self.waiting >= self.max_waiting:
            raise Overloaded(f"too many requests waiting for their turn (MAX_QUEUE={self.max_waiting}); retry later",
                             retry_after=1)
        waiter = _Waiter(n, asyncio.get_running_loop().create_future())
        self._queues.setdefault(caller, deque()).append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(caller, n)  # granted as we were cancelled: give it back
            else:
                self._forget(caller, waiter)
            raise

    def fail_waiting(self, error: Exception) -> None:
        """The end of the drain: every request still waiting its turn gets `error` (a 503)."""
        queues, self._queues = self._queues, OrderedDict()
        for q in queues.values():
            for waiter in q:
                if not waiter.future.done():
                    waiter.future.set_exception(error)

    def _forget(self, caller: str, waiter: _Waiter) -> None:
        q = self._queues.get(caller)
        if q is not None and waiter in q:
            q.remove(waiter)
            if not q:
                del self._queues[caller]

    def _release(self, caller: str, n: int) -> None:
        left = self.held.get(caller, 0) - n
        if left > 0:
            self.held[caller] = left
        else:
            self.held.pop(caller, None)
        self._grant()

    def _grant(self) -> None:
        """Give room to waiting callers in turn: each caller's first waiter, if it now fits."""
        for caller in list(self._queues):
            q = self._queues[caller]
            if not self._fits(caller, q[0].n):
                continue
            waiter = q.popleft()
            del self._queues[caller]
            if q:
                self._queues[caller] = q  # back of the line for its next request
            if waiter.future.cancelled():
                continue
            self.held[caller] = self.held.get(caller, 0) + waiter.n
            waiter.future.set_result(None)
