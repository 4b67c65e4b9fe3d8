"""CUDA_KERNELS=triton against =torch on one CUDA card (issue 22), and triton with ASYNC_SCHEDULING:
in-process decode tokens/s at 1 and 32 clients, greedy and sampled (the seed API's default, temperature 0.8 and top_k 50),
with transformers' batch-1 greedy decode on the same card as the peer, and whether the two
paths' greedy tokens agree. Random GPT-2 weights (bench/models.py); bench/gpu_check.sh runs it.

    python -m bench.cuda_kernels [--shape gpt2-124M] [--dtype bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

import torch

from bench import measure
from bench.models import SHAPES, gpt2_tokenizer, hf_and_ours, in_dtype
from bench.run import DTYPES, make_prompts
from model.engine import Engine, EngineConfig
from model.kernels import triton_decode

log = logging.getLogger(__name__)
KERNELS = ("torch", "triton")
ASYNC = "triton+async"  # CUDA_KERNELS=triton with ASYNC_SCHEDULING=true


async def rows_for(model, kernels: str, prompts: list[list[int]], new: int, clients: list[int],
                   async_scheduling: bool = False) -> dict:
    """One engine with CUDA_KERNELS=kernels: tok/s per (clients, greedy|sampled), its greedy tokens."""
    engine = Engine(model, EngineConfig(max_batch=max(clients), max_queue=1024, cuda_kernels=kernels,
                                        async_scheduling=async_scheduling))
    await engine.start()
    try:
        out = {"cuda_kernels": engine.runner.cuda_kernels, "tok_s": {},
               "greedy_tokens": await measure.engine_greedy(engine, prompts[0], new)}
        for c in clients:
            for sampled in (False, True):
                run = await measure.in_process_clients(engine, prompts[:c], new, per_client=2, warmup=1,
                                                       sampled=sampled)
                out["tok_s"][f"{c} clients, {'sampled' if sampled else 'greedy'}"] = run.tokens / run.wall_s
    finally:
        await engine.stop(drain=False)
    return out


async def run(args) -> dict:
    tokenizer = gpt2_tokenizer(None)
    clients = [int(c) for c in args.clients.split(",")]
    prompts, _ = make_prompts(tokenizer, max(clients), 64)
    hf, ours = hf_and_ours(args.shape, tokenizer)
    dtype = DTYPES[args.dtype]
    hf = hf.to("cuda", dtype)
    report = {"shape": args.shape, "dtype": args.dtype, "new_tokens": args.new, "device": torch.cuda.get_device_name(),
              "transformers_batch1_greedy_tok_s": measure.hf_decode_tok_s(hf, prompts[0], args.new, repeats=2)}
    del hf
    model = in_dtype(ours, dtype).to("cuda")
    missing = triton_decode.available()
    if missing:  # the torch rows still come back; the report says why the others do not
        report["triton_unavailable"] = missing
    for kernels in KERNELS[:1] if missing else KERNELS:
        report[kernels] = await rows_for(model, kernels, prompts, args.new, clients)
    if not missing:
        report[ASYNC] = await rows_for(model, "triton", prompts, args.new, clients, async_scheduling=True)
        report["async_greedy_tokens_equal"] = report[ASYNC].pop("greedy_tokens") == report["triton"]["greedy_tokens"]
        a, b = (report[k].pop("greedy_tokens") for k in KERNELS)
        report["greedy_tokens_agree"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return report


def table(r: dict) -> str:
    if "triton_unavailable" in r:
        return f"CUDA_KERNELS=triton not measured: {r['triton_unavailable']}\ntorch: {r['torch']['tok_s']}"
    lines = [f"## CUDA_KERNELS on {r['device']}, {r['shape']} {r['dtype']}, {r['new_tokens']} new tokens",
             f"transformers batch-1 greedy: {r['transformers_batch1_greedy_tok_s']:.0f} tok/s",
             f"greedy tokens equal for the first {r['greedy_tokens_agree']} of {r['new_tokens']}",
             f"async scheduling's greedy tokens equal triton's: {r['async_greedy_tokens_equal']}",
             "| row | torch tok/s | triton tok/s | triton + async tok/s | triton / torch | async / triton |",
             "|---|---|---|---|---|---|"]
    for row, t in r["torch"]["tok_s"].items():
        x, y = r["triton"]["tok_s"][row], r[ASYNC]["tok_s"][row]
        lines.append(f"| {row} | {t:.0f} | {x:.0f} | {y:.0f} | {x / t:.2f} | {y / x:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-124M", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--clients", default="1,32")
    p.add_argument("--new", type=int, default=64, help="new tokens per request")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench.cuda_kernels needs a CUDA device")
    report = asyncio.run(run(args))
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
