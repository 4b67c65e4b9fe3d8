"""What batch-invariant mode (EngineConfig.batch_invariant, BATCH_INVARIANT) costs on this CPU:

    python -m bench.invariant [--dtypes float32,bfloat16] [--rounds 3]

For each dtype, two engines on copies of the same GPT-2 124M-shape model, one per mode, taken
in turns (rounds interleaved, medians printed, so that the host's slow minutes fall on both):
batch-1 decode tokens/s, 32 in-process clients' aggregate tokens/s (64-token prompts, 64 new,
greedy), and the time to first token of one 1000-token prompt (its prefill).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics

import torch

from bench import measure
from bench.models import gpt2_tokenizer, hf_and_ours, in_dtype
from bench.run import DTYPES, make_prompts
from model.engine import Engine, EngineConfig
from model.sampling import SamplingParams

MODES = {"default": False, "batch-invariant": True}


async def prefill_s(engine: Engine, prompt: list[int]) -> float:
    r = await engine.submit(prompt, SamplingParams(max_new_tokens=1, temperature=0.0, stop_at_eot=False)).result()
    return r.ttft_s


async def one_round(engine: Engine, prompts: list[list[int]], long_prompt: list[int]) -> dict[str, float]:
    batch1 = await measure.engine_decode_tok_s(engine, prompts[0], 64, repeats=1)
    run = await measure.in_process_clients(engine, prompts, 64, per_client=1)
    return {"batch 1 tok/s": batch1, f"{len(prompts)} clients tok/s": run.tokens / run.wall_s,
            "1000-token prefill s": await prefill_s(engine, long_prompt)}


async def main(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    tokenizer = gpt2_tokenizer(None)
    _, base = hf_and_ours("gpt2-124M", tokenizer)
    prompts, _ = make_prompts(tokenizer, args.clients, 64)
    long_prompt = (sum(prompts, []) * 16)[:1000]
    print(f"| dtype | measurement | {' | '.join(MODES)} | ratio |\n|---|---|---:|---:|---:|")
    for name in args.dtypes.split(","):
        engines = {}
        for mode, invariant in MODES.items():
            model = in_dtype(copy.deepcopy(base), DTYPES[name])
            engines[mode] = Engine(model, EngineConfig(max_batch=args.clients, max_queue=1024,
                                                       batch_invariant=invariant))
            await engines[mode].start()
            await prefill_s(engines[mode], long_prompt)  # warm-up: the first long prefill allocates
        results: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
        for _ in range(args.rounds):
            for mode, engine in engines.items():
                for key, value in (await one_round(engine, prompts, long_prompt)).items():
                    results[mode].setdefault(key, []).append(value)
        for key in results["default"]:
            a, b = (statistics.median(results[mode][key]) for mode in MODES)
            print(f"| {name} | {key} | {a:.3g} | {b:.3g} | {b / a:.2f}x |")
        for engine in engines.values():
            await engine.stop(drain=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
