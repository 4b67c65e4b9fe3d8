"""Where a decode step's time goes, batch by batch:

    python -m bench.profile [--device cuda] [--shape gpt2-124M] [--dtype bfloat16] [--clients 1,32]

For each batch size: the engine's steps per second under that many in-process clients, the
time of the captured decode graph replayed alone (CUDA: the device's share of a step), and
the engine thread's own Python profile (the host's share), top functions by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import time

import torch

from bench import measure
from bench.models import gpt2_tokenizer, hf_and_ours, in_dtype
from bench.run import DTYPES, make_prompts
from model.engine import Engine


def profiled(run):
    """Engine._run with cProfile on (cProfile sees only the thread that enables it)."""
    def wrapper(self):
        self.profile = cProfile.Profile()
        self.profile.enable()
        try:
            run(self)
        finally:
            self.profile.disable()
    return wrapper


def replay_ms(engine: Engine, batch: int, kv_needed: int = 128, n: int = 50) -> float | None:
    """The decode graph for this batch and a 128-position context (the runs' 64 + 64), alone."""
    if not engine.runner.graphs:
        return None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        engine.runner.graphs.replay(batch, kv_needed)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


async def main(args) -> None:
    tokenizer = gpt2_tokenizer(None)
    _, ours = hf_and_ours(args.shape, tokenizer)
    model = in_dtype(ours, DTYPES[args.dtype]).to(args.device)
    prompts, _ = make_prompts(tokenizer, max(args.clients), 64)
    Engine._run = profiled(Engine._run)
    for batch in args.clients:
        engine = await measure.started_engine(model, max_batch=batch)
        steps0 = engine.stats().total_steps
        run = await measure.in_process_clients(engine, prompts[:batch], 64, args.per_client, warmup=1)
        steps = engine.stats().total_steps - steps0
        await engine.stop(drain=False)
        replay = replay_ms(engine, batch) if args.device.startswith("cuda") else None
        print(f"\n## batch {batch}: {run.summary()['tok_s']:.0f} tok/s, {run.wall_s / steps * 1e3:.2f} ms per step "
              f"over {steps} steps (prefill steps included); decode graph alone: "
              + (f"{replay:.2f} ms" if replay else "n/a"))
        out = io.StringIO()
        pstats.Stats(engine.profile, stream=out).sort_stats("tottime").print_stats(args.top)
        print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="gpt2-124M")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--clients", default="1,32")
    p.add_argument("--per-client", type=int, default=4)
    p.add_argument("--top", type=int, default=14)
    a = p.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    a.clients = [int(c) for c in a.clients.split(",")]
    asyncio.run(main(a))
