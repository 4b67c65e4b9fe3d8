"""Helpers shared by the server tests: wait on conditions with deadlines, never sleep to synchronise."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Awaitable, Callable

from model.engine import EngineConfig

# The engine the server tests run: small, seeded, on torch's CPU paths (no kernel build needed).
ENGINE_CONFIG = EngineConfig(max_batch=4, max_queue=8, cuda_graphs=False, cpu_linear="out_in", seed=0)


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0, what: str = "condition"):
    """Poll `predicate` until true; fail after `timeout` seconds (never a bare sleep to synchronise)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_ready(http, base: str, proc, timeout: float = 180) -> None:
    """Wait for a server process's /readyz 200; fail at once, with its log, if the process exits."""
    import aiohttp

    async def ready() -> bool:
        try:
            async with http.get(base + "/readyz") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            assert proc.poll() is None, proc.log_path.read_text()
            return False

    await wait_for(ready, timeout=timeout, what="server ready")


def wait_for_sync(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """Serve an app from a background thread with its own event loop, on a free port, so that
    synchronous clients (schemathesis, requests) can talk to it over real TCP."""

    def __init__(self, app):
        import threading

        self.app, self.base_url = app, ""
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from aiohttp import web

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.base_url = f"http://127.0.0.1:{port}"
        except BaseException as e:  # surface start-up failures to the test
            self._error = e
            raise
        finally:
            self._started.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> "ThreadServer":
        self._thread.start()
        if not self._started.wait(60) or self._error:
            raise RuntimeError(f"test server did not start: {self._error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


async def raw_exchange(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send raw bytes (headers aiohttp's client refuses to write) and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one HTTP/1.x response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body
