"""int8 weights at batch 1 on CPU: ours int8 vs ours bfloat16 vs transformers float32, same weights.

    python -m bench.int8 [--shape gpt2-124M] [--new-tokens 32] [--repeats 2] [--json out.json]

Prints tokens/s, weight bytes and how many greedy tokens int8 shares with bfloat16 and float32
(all three from one GPT-2-shaped random model, bench/models.py). Ours runs model/generate.py's
loop on torch's operators, not the engine: the engine's CPU set-up (model/fastpath.py) does not
take int8 layers yet, and without our kernels bfloat16 is torch's slow path too. Not part of
`make bench`'s table; a quick look, not a soak.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from bench import measure
from bench.models import SHAPES, gpt2_tokenizer, hf_and_ours, in_dtype
from model.generate import generate_ids
from model.quant import quantize_model, weight_bytes
from model.sampling import SamplingParams

log = logging.getLogger("bench.int8")


def agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode(model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Batch-1 greedy decode tokens/s (the tokens after the first over the time after it) and the tokens."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False).validate()
    tokens, stamps = [], []
    for token in generate_ids(model, prompt, params, 0, 50257):
        tokens.append(token)
        stamps.append(time.perf_counter())
    return (len(tokens) - 1) / max(stamps[-1] - stamps[0], 1e-9), tokens


def ours(models: dict, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    out = {}
    for name, model in models.items():
        decode(model, prompt, 2)  # warm-up
        runs = [decode(model, prompt, new_tokens) for _ in range(repeats)]
        rate, tokens = max(r[0] for r in runs), runs[0][1]
        out[name] = {"tok_s": rate, "weight_bytes": weight_bytes(model), "greedy": tokens}
        log.info("%s: %.1f tok/s, %.1f MiB", name, rate, out[name]["weight_bytes"] / 2**20)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-124M", choices=sorted(SHAPES))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    hf, fp32 = hf_and_ours(args.shape, gpt2_tokenizer(None))
    models = {"ours float32": fp32, "ours bfloat16": in_dtype(fp32, torch.bfloat16)}
    int8 = quantize_model(in_dtype(fp32, torch.float32), dtype=torch.float32)  # CPU serves in float32
    int8.tokenizer = fp32.tokenizer
    models["ours int8"] = int8
    prompt = list(range(1000, 1064))  # 64 tokens, as bench/run.py's batch-1 prompt length
    rows = ours(models, prompt, args.new_tokens, args.repeats)
    rows["transformers float32"] = {"tok_s": measure.hf_decode_tok_s(hf, prompt, args.new_tokens, args.repeats),
                                    "weight_bytes": weight_bytes(hf)}
    ref, bf16 = rows["ours float32"]["greedy"], rows["ours bfloat16"]["greedy"]
    q = rows["ours int8"]["greedy"]
    summary = {"int8_vs_bf16_tok_s": rows["ours int8"]["tok_s"] / rows["ours bfloat16"]["tok_s"],
               "int8_vs_bf16_weight_bytes": rows["ours int8"]["weight_bytes"] / rows["ours bfloat16"]["weight_bytes"],
               "greedy_agree": {"int8~float32": agree(q, ref), "int8~bfloat16": agree(q, bf16),
                                "bfloat16~float32": agree(bf16, ref), "of": args.new_tokens}}
    for name, row in rows.items():
        print(f"{name:22s} {row['tok_s']:8.1f} tok/s  {row['weight_bytes'] / 2**20:8.1f} MiB")
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
