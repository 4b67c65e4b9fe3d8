"""Measurements: ceilings of this machine, transformers' generate, our engine in-process and over HTTP.

Every timing is a median or best of a few runs after a warm-up, and synchronises CUDA
before reading the clock. Token counts are exact: the benchmark's models never emit
end-of-text (see models.hf_and_ours) and in-process runs set stop_at_eot=False.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from model.engine import Engine, EngineConfig
from model.sampling import SamplingParams


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best(fn, repeats: int, device="cpu") -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


# --- ceilings ---------------------------------------------------------------------

def matmul_flops(dtype: torch.dtype, device="cpu") -> float:
    """FLOP/s of a GEMM in `dtype` shaped like a batched MLP layer (F.linear, nn.Linear's
    layout): what a compute-bound batch can reach. Small on CPU, where some half-precision
    GEMMs take a slow path (one repeat then, so the benchmark still fits in minutes)."""
    m, k, n = (256, 768, 3072) if torch.device(device).type == "cpu" else (4096, 4096, 4096)
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    _sync(device)
    t0 = time.perf_counter()
    F.linear(x, w)
    _sync(device)
    first = time.perf_counter() - t0
    return 2 * m * k * n / (first if first > 0.5 else _best(lambda: F.linear(x, w), 3, device))


def copy_bandwidth(device="cpu", n_bytes: int = 256 * 2**20) -> float:
    """Bytes/s moved by a large tensor copy (read + write)."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * n_bytes / _best(lambda: dst.copy_(src), 3, device)


def host_speed(device="cpu") -> float:
    """Runs per second of a fixed workload of some 10 ms (a 512 x 512 float32 product and a
    32 MiB copy, best of three): sampled around each batch-1 round and client run, so that one this
    host's neighbours slowed (2-8x on the shared Xeon, for seconds to minutes) can be told
    from one that the code slowed."""
    a = torch.randn(512, 512, device=device)
    src = torch.empty(8 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)

    def work():
        a @ a
        dst.copy_(src)
    return 1.0 / _best(work, 3, device)


def batch1_ceiling(model, repeats: int = 5, via: str = "torch") -> float:
    """Tokens/s of one batch-1 pass over all of the model's weight matrices, with nothing
    else: the decode ceiling of a matrix-vector path. via="torch": F.linear on the weights
    in the layout they have now (torch's own ceiling); via="model": each layer's own
    forward, i.e. whatever the engine chose (our kernel, or torch's F.linear)."""
    p = next(model.parameters())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, 1, m.in_features, dtype=p.dtype, device=p.device) for m in linears]

    def one_pass():
        with torch.inference_mode():
            for x, m in zip(xs, linears):
                m(x) if via == "model" else F.linear(x, m.weight)
    return 1.0 / _best(one_pass, repeats, p.device)


def bandwidth_ceiling(model, copy_bytes_per_s: float) -> float:
    """Tokens/s if a decode step cost nothing but reading every weight matrix once at the
    copy bandwidth (a GPU's batch-1 bound; torch's eager pass there is bound by launches)."""
    return copy_bytes_per_s / weight_bytes(model)


def weight_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


# --- transformers -------------------------------------------------------------------

def hf_generate(hf, prompts: list[list[int]], new_tokens: int, repeats: int = 1) -> float:
    """Seconds for transformers' static-batch greedy generate(use_cache=True) of `new_tokens`."""
    device = next(hf.parameters()).device
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        use_cache=True, pad_token_id=50256)
    # warm-up; on a GPU in full: generate's first calls in a process there run at a third of its speed
    run(new_tokens if device.type == "cuda" else min(new_tokens, 8))
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run(new_tokens)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_decode_tok_s(hf, prompt: list[int], new_tokens: int, repeats: int = 1) -> float:
    """Batch-1 decode tokens/s: (n - 1) tokens over the time beyond a 1-token generate."""
    t_n = hf_generate(hf, [prompt], new_tokens, repeats)
    t_1 = hf_generate(hf, [prompt], 1, max(repeats, 2))
    return (new_tokens - 1) / max(t_n - t_1, 1e-9)


# --- our engine ------------------------------------------------------------------------

@dataclass
class ClientRun:
    clients: int
    requests: int
    tokens: int
    wall_s: float
    latencies: list
    ttfts: list
    via: str  # "http" or "in-process"
    client_cpu_s: float | None = None  # CPU seconds of the HTTP clients' own process
    # CPU seconds of the server's event-loop thread while the clients ran (their start-up too):
    # what serving HTTP took from the engine's cores, whatever the host's noise did to the rates
    server_cpu_s: float | None = None
    # when each client's first timed request reached the engine, seconds after the first did
    arrivals: list | None = None

    def summary(self) -> dict:
        q = statistics.quantiles
        lat = sorted(self.latencies)
        return {
            "clients": self.clients, "requests": self.requests, "tokens": self.tokens, "via": self.via,
            "tok_s": self.tokens / self.wall_s, "wall_s": self.wall_s,
            "p50_latency_s": statistics.median(lat),
            "p99_latency_s": q(lat, n=100)[98] if len(lat) > 1 else lat[0],
            "p50_ttft_s": statistics.median(self.ttfts),
            "client_cpu_cores": None if self.client_cpu_s is None else self.client_cpu_s / self.wall_s,
            "server_loop_cpu_cores": None if self.server_cpu_s is None else self.server_cpu_s / self.wall_s,
        }


async def started_engine(model, max_batch: int = 32) -> Engine:
    engine = Engine(model, EngineConfig(max_batch=max_batch, max_queue=1024))
    await engine.start()
    return engine


async def engine_decode_tok_s(engine: Engine, prompt: list[int], new_tokens: int, repeats: int = 2) -> float:
    """Batch-1 decode tokens/s inside the engine: tokens after the first over the time after it."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False)
    await engine.submit(prompt, SamplingParams(max_new_tokens=2, temperature=0.0)).result()  # warm-up
    rates = []
    for _ in range(repeats):
        r = await engine.submit(prompt, params).result()
        rates.append((r.completion_tokens - 1) / (r.total_s - r.ttft_s))
    return statistics.median(rates)  # as transformers' runs are taken


async def engine_greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    r = await engine.submit(prompt, SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eot=False)).result()
    return r.token_ids


SAMPLED = SamplingParams(temperature=0.8, top_k=50)  # the seed API's defaults


async def in_process_clients(engine: Engine, prompts: list[list[int]], new_tokens: int, per_client: int,
                             warmup: int = 0, arrivals: list[float] | None = None,
                             sampled: bool = False) -> ClientRun:
    """`len(prompts)` concurrent clients, each sending `per_client` requests back to back
    (after `warmup` untimed ones each): all at once, or client i's first timed request
    `arrivals[i]` seconds after the first client's (to replay an HTTP run's arrivals).
    Greedy, or with `sampled` the seed API's default sampling (SAMPLED)."""
    params = replace(SAMPLED if sampled else SamplingParams(temperature=0.0), max_new_tokens=new_tokens,
                     stop_at_eot=False)
    lat, ttft, tokens = [], [], 0
    t0 = 0.0

    async def client(prompt, n, timed=True, start=0.0):
        nonlocal tokens
        if start:  # an arrival schedule, not synchronisation: the client starts when its HTTP twin did
            await asyncio.sleep(max(0.0, t0 + start - time.perf_counter()))
        for _ in range(n):
            r = await engine.submit(prompt, params).result()
            if timed:
                lat.append(r.total_s)
                ttft.append(r.ttft_s)
                tokens += r.completion_tokens

    await asyncio.gather(*(client(p, warmup, timed=False) for p in prompts))
    starts = arrivals or [0.0] * len(prompts)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(p, per_client, start=a) for p, a in zip(prompts, starts)))
    via = "in-process" if arrivals is None else "in-process, HTTP's arrivals"
    if sampled:
        via += f", sampled: temperature {SAMPLED.temperature}, top_k {SAMPLED.top_k}"
    return ClientRun(len(prompts), len(lat), tokens, time.perf_counter() - t0, lat, ttft, via)


def server_available() -> str | None:
    """None when server.app can serve an engine, else why not."""
    try:
        from server.app import create_app  # noqa: F401
        from server.config import load_config  # noqa: F401
        return None
    except Exception as err:
        return f"server not importable ({type(err).__name__}: {err})"


async def http_clients(engine: Engine, texts: list[str], new_tokens: int, per_client: int,
                       warmup: int = 0, stream: bool = True) -> ClientRun:
    """The same load through server.app over real HTTP on 127.0.0.1, streaming (SSE) so the
    first token's arrival is seen, or not (then the time to first token is the latency).
    The clients run in their own process (bench/load.py), after `warmup` untimed requests
    each. The server owns (and finally stops) the engine."""
    from aiohttp import web

    from server.app import create_app
    from server.config import load_config

    # One tenant (every client is 127.0.0.1): it may hold every row, as the in-process replay does.
    rows = str(engine.config.max_batch)
    config = load_config([], environ={"HOST": "127.0.0.1", "PORT": "0", "CACHE_TTL": "0", "LOG_LEVEL": "WARNING",
                                      "MAX_BATCH": rows, "MAX_QUEUE": "1024", "MAX_ROWS_PER_CALLER": rows})
    # when requests reach the engine (the first of each client's timed ones: its arrival)
    submitted, submit = [], engine.submit
    engine.submit = lambda *args, **kwargs: submitted.append(time.perf_counter()) or submit(*args, **kwargs)
    runner = web.AppRunner(create_app(config, engine=engine), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    loop_cpu = time.thread_time()  # this thread runs the server's event loop
    try:
        job = {"url": url, "texts": texts, "new_tokens": new_tokens, "per_client": per_client, "warmup": warmup,
               "stream": stream}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.load", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1])
        out, _ = await proc.communicate(json.dumps(job).encode())
        if proc.returncode != 0:
            raise RuntimeError(f"bench.load failed (exit {proc.returncode}); its error is above")
        run = json.loads(out)
        loop_cpu = time.thread_time() - loop_cpu
    finally:
        await runner.cleanup()
    first = sorted(submitted[warmup * len(texts):])[:len(texts)]  # after the warm-up round
    return ClientRun(len(texts), len(run["latencies"]), run["tokens"], run["wall_s"], run["latencies"],
                     run["ttfts"], "http" if stream else "http, not streamed", run["cpu_s"],
                     arrivals=[t - first[0] for t in first], server_cpu_s=loop_cpu)
