"""A file server for the fetch tests (imported as `fetch_helpers`): aiohttp on loopback in a thread of its
own, serving bytes with HTTP ranges, ETags and If-Range, that can be told to misbehave per request:
stall in the middle of a body, drop the connection, send other bytes, or answer with a status.
It records every request, so that a test can count what reached it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections import defaultdict
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Fault:
    kind: str  # "stall" | "drop" | "corrupt" | "status"
    after: int = 0  # bytes of the body sent before a stall or a drop
    status: int = 500


@dataclass
class Seen:
    method: str
    path: str
    headers: dict


class FileServer:
    def __init__(self, files: dict[str, bytes] | None = None, head_allowed: bool = True):
        self.files = dict(files or {})
        self.head_allowed = head_allowed
        self.faults: dict[str, list[Fault]] = defaultdict(list)
        self.requests: list[Seen] = []
        self.extra_headers: dict[str, dict] = defaultdict(dict)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    # -- what tests use
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def gets(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.method == "GET" and r.path == "/" + path.lstrip("/")]

    def etag(self, path: str) -> str:
        return '"' + hashlib.sha1(self.files[path]).hexdigest() + '"'

    def __enter__(self) -> "FileServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the test file server did not start within 10 s")
        return self

    def __exit__(self, *exc) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # -- the server
    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop, self._release = asyncio.Event(), asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        self._release.set()  # stalled handlers finish
        await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.requests.append(Seen(request.method, request.path, dict(request.headers)))
        fault = self.faults[path].pop(0) if self.faults[path] and request.method == "GET" else None
        if fault is not None and fault.kind == "status":
            return web.Response(status=fault.status, text="no")
        if request.method == "HEAD" and not self.head_allowed:
            return web.Response(status=403)
        if path not in self.files:
            return web.Response(status=404, text="not here")
        data, etag = self.files[path], self.etag(path)
        headers = {"ETag": etag, "Accept-Ranges": "bytes", **self.extra_headers[path]}
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if m and request.headers.get("If-Range", etag) == etag:
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data = data[:end]
        body = data[start:]
        if fault is not None and fault.kind == "corrupt":
            body = bytes(b ^ 0xFF for b in body)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        if fault is not None and fault.kind in ("stall", "drop"):
            await resp.write(body[:fault.after])
            if fault.kind == "drop":
                request.transport.close()
                return resp
            await self._release.wait()  # a stall: the connection stays open and silent
            return resp
        for i in range(0, len(body), 1 << 16):
            await resp.write(body[i:i + (1 << 16)])
        await resp.write_eof()
        return resp
