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


_FLIP = bytes(255 - i for i in range(256))


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
    def __init__(self, files: dict[str, bytes] | None = None, head_allowed: bool = True, ssl_context=None):
        self.files = dict(files or {})
        self.ssl_context = ssl_context
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
        scheme, host = ("https", "localhost") if self.ssl_context else ("http", "127.0.0.1")
        return f"{scheme}://{host}:{self.port}/{path.lstrip('/')}"

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
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
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
            body = body.translate(_FLIP)
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


class HubServer(FileServer):
    """A stand-in for the Hugging Face Hub's resolve endpoint, as huggingface_hub uses it:

        HEAD|GET /{org}/{repo}/resolve/{revision}/{path}
          small files   200, ETag "<git blob sha1>", X-Repo-Commit
          LFS files     302 to /cdn/<sha256> (another URL, as the Hub's CDN is another host), with
                        X-Linked-Etag "<sha256>", X-Linked-Size, X-Repo-Commit
          missing       401 X-Error-Code: RepoNotFound | 404 RevisionNotFound | 404 EntryNotFound
          gated         403 X-Error-Code: GatedRepo
    The CDN paths are served by FileServer itself (ranges, faults).
    """

    COMMIT = "0123456789abcdef0123456789abcdef01234567"
    LFS_SUFFIXES = (".safetensors", ".bin", ".pt")

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__({})
        self.repos = repos
        self.gated: set[str] = set()  # repos whose terms the token's user has not accepted
        for files in repos.values():
            for name, data in files.items():
                if name.endswith(self.LFS_SUFFIXES):
                    self.files[f"cdn/{hashlib.sha256(data).hexdigest()}"] = data

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        m = re.fullmatch(r"([^/]+/[^/]+)/resolve/([^/]+)/(.+)", request.match_info["path"])
        if not m:
            return await super()._handle(request)
        self.requests.append(Seen(request.method, request.path, dict(request.headers)))
        repo, revision, name = m.groups()
        if repo not in self.repos:
            return web.Response(status=401, headers={"X-Error-Code": "RepoNotFound"})
        if repo in self.gated:
            return web.Response(status=403, headers={"X-Error-Code": "GatedRepo"})
        if revision not in ("main", self.COMMIT):
            return web.Response(status=404, headers={"X-Error-Code": "RevisionNotFound"})
        files = self.repos[repo]
        if name not in files:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.COMMIT})
        data = files[name]
        blob_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        headers = {"X-Repo-Commit": self.COMMIT, "ETag": f'"{blob_sha1}"'}
        if name.endswith(self.LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                            "Location": f"http://localhost:{self.port}/cdn/{sha}?X-Amz-Signature=abc"})
            return web.Response(status=302, headers=headers)
        if request.method == "HEAD":
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_length = len(data)
            await resp.prepare(request)
            return resp
        return web.Response(body=data, headers=headers)
