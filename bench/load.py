"""The HTTP load generator, run in its own process (`python -m bench.load`) so that the
clients' work (JSON parsing of every streamed event) does not share the server's event
loop and interpreter lock, as real clients would not.

Reads one JSON object on stdin: {"url", "texts", "new_tokens", "per_client", "warmup", "stream"}.
Once /readyz answers 200, each text is one client sending `per_client` /v1/completions requests
(streamed as server-sent events, or not) back to back, after `warmup` untimed requests each.
Writes one JSON object on stdout: the wall
and CPU time of the timed part (the CPU this process took from the server's machine, which
remote clients would not) and each request's latency, time to first token and tokens.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def one_request(session: aiohttp.ClientSession, url: str, text: str, new_tokens: int, stream: bool) -> tuple:
    """(latency s, time to first text s, completion tokens) of one completion; without
    streaming the first text comes with the last."""
    body = {"prompt": text, "max_tokens": new_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        if not stream:
            tokens = (await resp.json())["usage"]["completion_tokens"]
        else:
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if first is None and event.get("choices") and event["choices"][0].get("text"):
                    first = time.perf_counter() - t0
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return latency, first if first is not None else latency, tokens


async def run(job: dict) -> dict:
    url, new = job["url"], job["new_tokens"]
    connector = aiohttp.TCPConnector(limit=0)  # one connection per client, however many
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client(text: str, n: int) -> list:
            return [await one_request(session, url, text, new, job["stream"]) for _ in range(n)]

        deadline = time.monotonic() + 120
        while (await session.get(url + "/readyz")).status != 200:  # a client waits as a real one would
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready in 120 s")
            await asyncio.sleep(0.05)
        await asyncio.gather(*(client(t, job["warmup"]) for t in job["texts"]))
        t0, cpu0 = time.perf_counter(), time.process_time()
        runs = await asyncio.gather(*(client(t, job["per_client"]) for t in job["texts"]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    requests = [r for per_client in runs for r in per_client]
    return {"wall_s": wall, "cpu_s": cpu, "latencies": [r[0] for r in requests], "ttfts": [r[1] for r in requests],
            "tokens": sum(r[2] for r in requests)}


if __name__ == "__main__":
    json.dump(asyncio.run(run(json.load(sys.stdin))), sys.stdout)
