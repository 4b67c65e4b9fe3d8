"""The process's serving state: the engine once loaded, readiness, draining, in-flight count.

One `Lifecycle` lives on the app (keys.LIFECYCLE). The model loads in the background
(app.engine_ctx) so the server listens at once; `/readyz` turns true when the engine
has warmed up and false again the moment SIGTERM starts the drain.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .errors import Draining, NotReady


@dataclass(frozen=True)
class ModelInfo:
    """What /health, /v1/models and the cache key say about the loaded model."""

    name: str
    digest: str
    n_params: int
    path: str
    format: str
    device: str
    dtype: str
    created: int = field(default_factory=lambda: int(time.time()))
    aliases: tuple[str, ...] = ()  # further names clients may send (SERVED_MODEL_NAME)
    max_model_len: int = 0  # the context window, in tokens

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


class Lifecycle:
    def __init__(self) -> None:
        self.engine = None  # model.engine.Engine once loaded
        self.model: ModelInfo | None = None
        self.load_error: str | None = None
        self.started = False  # engine.start() has returned
        self.draining = False
        self.inflight = 0  # generation requests being served
        self._idle = asyncio.Event()
        self._idle.set()
        self.loaded = asyncio.Event()  # set when loading finished, successfully or not

    @property
    def ready(self) -> bool:
        return self.engine is not None and bool(self.engine.ready) and not self.draining

    @property
    def alive(self) -> bool:
        """Liveness: False only when the model failed to load or the engine loop died."""
        if self.load_error is not None:
            return False
        return not self.started or (self.engine is not None and bool(self.engine.alive))

    def engine_or_raise(self):
        if self.draining:
            raise Draining("server is shutting down; retry on another replica", retry_after=1)
        if self.engine is None or not self.engine.ready:
            raise NotReady("model is loading; retry shortly", retry_after=2)
        return self.engine

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def exit(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True if every in-flight request finished within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False
