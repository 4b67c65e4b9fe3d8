"""server/connections.py: slow clients are cut, connections are capped, protocol errors are
JSON 400s that never echo or log the request's bytes, and each is counted."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from server.errors import Draining
from server_helpers import parse_response, raw_exchange, wait_for, wait_for_sync

REPO = Path(__file__).resolve().parents[2]

KEY = "s3cret-key-0123456789"


async def read_all(reader: asyncio.StreamReader, timeout: float = 20.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def test_a_head_sent_a_byte_at_a_time_is_cut(guarded_app):
    port, guard, _ = await guarded_app(header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # the head never ends
    status, _, body = parse_response(await read_all(reader))
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert "HEADER_TIMEOUT" in json.loads(body)["error"]["message"]
    writer.close()
    _, silent = await asyncio.open_connection("127.0.0.1", port)  # never sends a byte
    assert (await read_all(_)).startswith(b"HTTP/1.1 408")
    silent.close()
    await wait_for(lambda: guard.open == 0, what="connections released")


async def test_a_body_that_never_ends_is_408(guarded_app):
    port, guard, _ = await guarded_app(body_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\":")
    status, _, body = parse_response(await read_all(reader))
    assert status == 408, body
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and "BODY_TIMEOUT" in err["message"]
    writer.close()


async def test_the_drain_cuts_bodies_still_arriving(guarded_app):
    port, guard, app = await guarded_app(body_timeout=600)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\":")
    await wait_for(lambda: any(h._body is not None for h in guard.handlers), what="body in progress")
    guard.cut_bodies(Draining("server is shutting down; retry on another replica", retry_after=1))
    status, headers, body = parse_response(await read_all(reader))
    assert status == 503 and json.loads(body)["error"]["code"] == "draining" and headers["retry-after"] == "1"
    writer.close()


async def test_connections_are_capped_per_client(guarded_app):
    port, guard, _ = await guarded_app(max_per_client=2)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await wait_for(lambda: guard.open == 2, what="two connections admitted")
    status, headers, body = parse_response(await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"))
    assert status == 503 and headers["retry-after"] == "1"
    assert "MAX_CONNECTIONS_PER_CLIENT=2" in json.loads(body)["error"]["message"]
    held.pop()[1].close()
    await wait_for(lambda: guard.open == 1, what="a connection released")
    raw = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert parse_response(raw)[0] == 200
    for _, w in held:
        w.close()


MALFORMED = [
    b"X-API-Key: " + KEY.encode() + b"\x01\r\n",
    b"Authorization: Bearer " + KEY.encode() + b"\rX\r\n",
]


async def test_malformed_headers_are_json_400s_that_never_show_the_key(guarded_app, config, caplog):
    import dataclasses

    caplog.set_level(logging.DEBUG)
    port, guard, app = await guarded_app(dataclasses.replace(config, api_key=KEY))
    for header in MALFORMED:
        raw = await raw_exchange(port, b"POST /generate HTTP/1.1\r\nHost: t\r\n" + header + b"Content-Length: 2\r\n\r\n{}")
        status, headers, body = parse_response(raw)
        assert status == 400 and headers["content-type"].startswith("application/json"), raw
        assert json.loads(body)["error"]["code"] == "malformed_request"
        assert KEY.encode() not in raw
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert KEY not in logged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.status for r in caplog.records if r.getMessage() == "request" and r.route == "malformed"] == [400, 400]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    counted = [s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "nanogpt_http_requests_total" and s.labels.get("route") == "malformed"]
    assert counted == [2.0]


async def test_a_corrupt_body_refused_before_reading_logs_no_error(guarded_app, config, caplog):
    import dataclasses

    port, _, _ = await guarded_app(dataclasses.replace(config, api_key=KEY))
    raw = await raw_exchange(port, b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                                   b"Content-Encoding: gzip\r\nContent-Length: 12\r\n\r\nnot gzip....")
    assert parse_response(raw)[0] == 401  # no key: refused before the body is read
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


SERVE_WITH_FEW_FILES = """
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from aiohttp import web
from server.connections import ConnectionGuard, ConnectionLimits, listen
from server.logs import setup_logging

async def main():
    setup_logging()
    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    limits = ConnectionLimits(header_timeout=float(sys.argv[1]), max_connections=100000, max_per_client=100000)
    listener = await listen(runner, "127.0.0.1", 0, ConnectionGuard(limits))
    print(listener.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_slowloris_past_the_file_limit_still_lets_new_clients_in(tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_FEW_FILES, "2"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=log, env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    slow: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        for _ in range(400):  # more than the server has descriptors for; each sends one byte of a head
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            slow.append(s)
            try:
                s.sendall(b"G")
            except OSError:  # refused over the cap and already closed: what the cap is for
                pass

        def get() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                out = b""
                while chunk := c.recv(65536):
                    out += chunk
                return out

        def served() -> bool:
            try:  # at the limit a new connection may be answered 503 or reset; it must not hang
                return get().startswith(b"HTTP/1.1 200")
            except ConnectionResetError:
                return False

        wait_for_sync(served, timeout=30, what="a new client served")
    finally:
        for s in slow:
            s.close()
        proc.kill()
        proc.wait(timeout=10)
    text = log_path.read_text()
    assert "MAX_CONNECTIONS lowered to fit the file-descriptor limit" in text
    assert text.count("socket.accept() out of system resource") <= 3  # once per interval at most
    assert text.count("refusing connections over the limit") <= 3
