"""What the logprobs code path costs requests that do not ask for logprobs:

    python -m bench.logprobs [--rounds 3] [--clients 8] [--shape gpt2-124M]

Two engines on copies of one random GPT-2-shaped model: the engine as it is, and the same
engine with its runner's logprobs hooks (model/engine/runner.py `_score_prompts`,
`_score_samples`) replaced by no-ops, i.e. the engine without the feature. Both serve the same
plain requests (no logprobs), in interleaved rounds (medians printed, so a slow minute of a
shared host falls on both): batch-1 decode tokens/s and `--clients` concurrent clients'
aggregate tokens/s. A third row shows, for scale, what one lm-eval style request (echo +
logprobs over a 512-token prompt) costs the engine that computes it. Not part of bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import statistics
import time

import torch

from bench import measure
from bench.models import SHAPES, gpt2_tokenizer, hf_and_ours
from model.engine import Engine, EngineConfig
from model.sampling import SamplingParams


def without_logprobs(engine: Engine) -> Engine:
    """The engine with its runner's logprobs hooks removed: the baseline the feature must not slow
    down (plain requests never get scoring plans, so the scheduler's side is checks only)."""
    engine.runner._score_prompts = lambda chunks, hidden, scores: None
    engine.runner._score_samples = lambda logits, d, sampled, scores: None
    return engine


async def one_round(engine: Engine, prompts: list[list[int]]) -> dict[str, float]:
    batch1 = await measure.engine_decode_tok_s(engine, prompts[0], 64, repeats=1)
    run = await measure.in_process_clients(engine, prompts, 64, per_client=1)
    return {"batch 1 tok/s": batch1, f"{len(prompts)} clients tok/s": run.tokens / run.wall_s}


async def scoring_s(engine: Engine, prompt: list[int]) -> float:
    """Seconds for one loglikelihood request (echo, logprobs 1, max_tokens 1) over `prompt`."""
    t0 = time.perf_counter()
    r = await engine.submit(prompt, SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=1,
                                                   prompt_logprobs=1)).result()
    assert len(r.prompt_logprobs) == len(prompt)
    return time.perf_counter() - t0


async def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    _, base = hf_and_ours(args.shape, gpt2_tokenizer(None))
    rng = random.Random(0)
    prompts = [[rng.randrange(50000) for _ in range(64)] for _ in range(args.clients)]
    engines = {}
    for name, wrap in (("with logprobs code", lambda e: e), ("without", without_logprobs)):
        model = copy.deepcopy(base)
        model.tokenizer = base.tokenizer
        engines[name] = wrap(Engine(model, EngineConfig(max_batch=args.clients, max_queue=1024)))
        await engines[name].start()
    results: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    order = list(engines)
    for _ in range(args.rounds):
        for name in order:
            for key, value in (await one_round(engines[name], prompts)).items():
                results[name].setdefault(key, []).append(value)
        order.reverse()  # neither engine always runs first (warm caches, a neighbour's burst)
    a_name, b_name = engines
    print(f"| {args.shape}, plain requests | {a_name} | {b_name} (baseline) | ratio |\n|---|---:|---:|---:|")
    medians = {}
    for key in results[a_name]:
        a, b = (statistics.median(results[n][key]) for n in engines)
        medians[key] = {"with": a, "without": b, "ratio": round(a / b, 3)}
        print(f"| {key} | {a:.3g} | {b:.3g} | {a / b:.2f}x |")
    long_prompt = (sum(prompts, []) * 8)[:512]
    score = statistics.median([await scoring_s(engines[a_name], long_prompt) for _ in range(args.rounds)])
    print(f"| one echo+logprobs request, 512 prompt tokens | {score:.3g} s | - | - |")
    for engine in engines.values():
        await engine.stop(drain=False)
    _write(args, {"medians": medians, "rounds": results, "echo_logprobs_512_prompt_s": score})


def _write(args, figures: dict) -> None:
    """The run as JSON in bench/results/ (git-ignored; bench/history.json keeps the figures)."""
    import json
    import os
    import platform
    from pathlib import Path

    out = Path(args.out or f"bench/results/logprobs-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python -m bench.logprobs", "shape": args.shape, "rounds": args.rounds,
                               "clients": args.clients, "threads": torch.get_num_threads(),
                               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                               "torch": torch.__version__, **figures}, indent=1))
    print(f"wrote {out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gpt2-124M", choices=sorted(SHAPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/logprobs-<time>.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
