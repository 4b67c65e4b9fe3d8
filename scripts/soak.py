"""A bounded soak of the real server (`make soak`; not part of the test suite).

Starts `python -m server` on the demo model, sends a fixed number of mixed requests
(streaming, non-streaming, OpenAI completions, streams the client abandons, oversized,
malformed JSON, malformed HTTP, slow heads), and prints requests by status, latency
p50/p99, and the server's RSS and open descriptors at the start and the end. Exits 1 on
any 5xx, any request that got no answer, or RSS/descriptors that grew past the tolerance.

    python scripts/soak.py --requests 2000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
KINDS = ("stream", "plain", "openai", "cancelled", "oversized", "bad_json", "bad_http", "slow_head")
WEIGHTS = (30, 30, 15, 10, 5, 5, 3, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_usage(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open descriptors) of a process, from /proc."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def raw(port: int, data: bytes, pause: float = 0.0) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.read(), 60)
        return int(head.split(b" ", 2)[1]) if head else -1
    finally:
        writer.close()


async def one(kind: str, http: aiohttp.ClientSession, base: str, port: int, max_length: int) -> int:
    """The status the request got; -1 when it got no answer (a lost request)."""
    body = {"prompt": random.choice(["ROMEO:", "The ", "First Citizen:\n"]), "max_length": max_length}
    if kind == "stream":
        async with http.post(base + "/generate", json={**body, "stream": True}) as r:
            text = await r.text()
            return r.status if text.rstrip().endswith("data: [DONE]") else -1
    if kind == "plain":
        async with http.post(base + "/generate", json=body) as r:
            await r.read()
            return r.status
    if kind == "openai":
        async with http.post(base + "/v1/completions", json={"prompt": body["prompt"], "max_tokens": max_length}) as r:
            await r.read()
            return r.status
    if kind == "cancelled":
        async with http.post(base + "/generate", json={**body, "max_length": 200, "stream": True}) as r:
            await r.content.readline()
            r.close()  # the client walks away mid-stream
            return r.status
    if kind == "oversized":
        async with http.post(base + "/generate", json={"prompt": "x" * (2 << 20)}) as r:
            await r.read()
            return r.status
    if kind == "bad_json":
        async with http.post(base + "/generate", data=b'{"prompt": NaN', headers={"Content-Type": "application/json"}) as r:
            await r.read()
            return r.status
    if kind == "bad_http":
        return await raw(port, b"POST /generate HTTP/1.1\r\nHost: s\r\nX-API-Key: key\x01\r\nContent-Length: 2\r\n\r\n{}")
    if kind == "slow_head":  # HEADER_TIMEOUT (lowered below) answers 408
        return await raw(port, b"GET /healthz HTTP/1.1\r\nHost: s\r\n")
    raise ValueError(kind)


async def wait_ready(http: aiohttp.ClientSession, base: str, proc: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            async with http.get(base + "/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not become ready; see {log}")
        await asyncio.sleep(0.2)


async def settled_usage(pid: int, baseline_fds: int | None = None, timeout: float = 15.0) -> tuple[int, int]:
    """RSS and descriptors once the server has seen the client's connections close (it learns
    of a close only when it next reads): at or below `baseline_fds`, or after `timeout`."""
    deadline = time.monotonic() + timeout
    usage = process_usage(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        last, usage = usage, process_usage(pid)
        if (baseline_fds is not None and usage[1] <= baseline_fds) or (baseline_fds is None and usage[1] == last[1]):
            break
    return usage


async def soak(args: argparse.Namespace) -> dict:
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu", "HEADER_TIMEOUT": "1",
           "MAX_QUEUE": str(max(64, 2 * args.concurrency)), "CACHE_TTL": "0",
           "MODEL_CHECKPOINT": str(REPO / "model" / "demo")}
    log = open(args.log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    statuses: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=300)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await wait_ready(http, base, proc, args.log)
            for _ in range(8):  # warm-up, outside the figures
                await one("plain", http, base, port, args.max_length)
        start = await settled_usage(proc.pid)  # the client's keep-alive connections closed
        random.seed(args.seed)
        kinds = random.choices(KINDS, WEIGHTS, k=args.requests)
        sem = asyncio.Semaphore(args.concurrency)
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def run(kind: str) -> None:
                async with sem:
                    t0 = time.perf_counter()
                    try:
                        status = await one(kind, http, base, port, args.max_length)
                    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError):
                        status = -1
                    latencies.append(time.perf_counter() - t0)
                    statuses[status] += 1
                    by_kind[kind][status] += 1

            await asyncio.gather(*(run(k) for k in kinds))
            async with http.get(base + "/healthz") as r:
                assert r.status == 200
        end = await settled_usage(proc.pid, start[1])
    finally:
        proc.terminate()
        code = proc.wait(timeout=120)
    latencies.sort()
    return {
        "requests": args.requests, "concurrency": args.concurrency,
        "by_status": {str(k): v for k, v in sorted(statuses.items())},
        "by_kind": {k: {str(s): n for s, n in sorted(c.items())} for k, c in sorted(by_kind.items())},
        "lost": statuses.get(-1, 0), "5xx": sum(v for k, v in statuses.items() if k >= 500),
        "p50_s": round(latencies[len(latencies) // 2], 4), "p99_s": round(latencies[int(len(latencies) * 0.99)], 4),
        "rss_kib": {"start": start[0], "end": end[0]}, "fds": {"start": start[1], "end": end[1]},
        "exit_code": code,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth, a fraction")
    parser.add_argument("--fd-tolerance", type=int, default=4, help="allowed growth in open descriptors")
    parser.add_argument("--log", default="soak-server.log")
    args = parser.parse_args()
    report = asyncio.run(soak(args))
    print(json.dumps(report, indent=2))
    rss_ok = report["rss_kib"]["end"] <= report["rss_kib"]["start"] * (1 + args.rss_tolerance)
    fds_ok = report["fds"]["end"] <= report["fds"]["start"] + args.fd_tolerance
    ok = report["5xx"] == 0 and report["lost"] == 0 and rss_ok and fds_ok and report["exit_code"] == 0
    print("soak:", "ok" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
