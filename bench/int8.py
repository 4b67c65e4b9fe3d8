"""int8 weights on CPU, through the engine: ours int8 vs ours bfloat16 vs transformers float32, same weights.

    python -m bench.int8 [--shape gpt2-124M] [--new-tokens 32] [--rounds 2] [--clients 32] [--llama-cpp] [--json out.json]

One phase (`bench_int8`), also run by `python -m bench.run --int8`: batch-1 decode tokens/s of our
engine with int8 weights (model/quant.py; the CPU kernel's linear_rows_int8) in bfloat16 and in
float32 activations, of our engine in bfloat16 (the kernel's bfloat16 rows), and of transformers'
generate in float32, in alternating rounds, each row keeping its best (the host is shared); then
`--clients` concurrent greedy clients on int8 and on bfloat16 (two alternating rounds, each its
best); weight bytes of int8 and bfloat16 for GPT-2 124M's and 355M's shapes (laid out on the meta
device, nothing allocated) and the peak RSS of a fresh process serving each from its export; and
how many greedy tokens int8 shares with bfloat16 and float32. With --llama-cpp (here, or
bench/run.py's, where llama-cpp-python is installed) llama.cpp's q8_0 on the same weights is loaded
once and timed in every round beside ours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

import torch

from bench import llama, measure
from bench.models import SHAPES, gpt2_tokenizer, hf_and_ours, in_dtype
from model.gpt import GPT, GPTConfig
from model.quant import quantize_model, weight_bytes

log = logging.getLogger("bench.int8")
TARGETS = {"int8_vs_bf16_b1": 1.6, "int8_vs_bf16_weight_bytes": 0.55, "int8_vs_bf16_clients": 1.0,
           "int8_vs_llama_q8_0_b1": 1.0}  # issue #20


def agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def shape_config(shape: str) -> GPTConfig:
    n_layer, n_head, n_embd = SHAPES[shape]
    return GPTConfig(block_size=1024, vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def shape_weight_bytes(shape: str) -> dict:
    """int8 and bfloat16 weight bytes of a GPT-2 shape, counted on the meta device."""
    cfg = shape_config(shape)
    with torch.device("meta"):
        bf16 = GPT(cfg).to(torch.bfloat16)
        int8 = quantize_model(GPT(cfg), dtype=torch.bfloat16)
    out = {"bfloat16": weight_bytes(bf16), "int8": weight_bytes(int8)}
    out["ratio"] = out["int8"] / out["bfloat16"]
    return out


# A fresh process's peak RSS: torch alone, or loading an export and generating 8 greedy tokens.
# VmHWM, not getrusage's ru_maxrss: Linux carries the forking parent's peak into the child's.
RSS_PROBE = """\
import sys
import model
if len(sys.argv) > 1:
    m = model.load_model_from_checkpoint(sys.argv[1], device="cpu", dtype="bfloat16")
    model.generate_text(m, "The", max_length=8, temperature=0)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024)
"""


def probe_peak_rss(*export: str) -> int:
    """RSS_PROBE's figure in bytes, for an export directory or (none given) torch alone."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RSS_PROBE, *export], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def shape_peak_rss(shape: str, torch_alone: int) -> dict:
    """Peak RSS (bytes) of a process that loads a GPT-2 shape's bfloat16 export and of one that
    loads its int8 export (random weights, written to a temporary directory, read back as a server
    would), beside `torch_alone` (probe_peak_rss()): the runtime's share, which both carry."""
    import tempfile

    from model.export import save_export

    out = {"torch": torch_alone}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = GPT(shape_config(shape)).eval()
        fp32.tokenizer = None  # in_dtype copies it; the export stores GPT-2's spec instead
        for kind, m in (("bfloat16", in_dtype(fp32, torch.bfloat16)),
                        ("int8", quantize_model(in_dtype(fp32, torch.float32), dtype=torch.bfloat16))):
            save_export(m, f"{tmp}/{kind}", {"kind": "gpt2"})
            del m
            out[kind] = probe_peak_rss(f"{tmp}/{kind}")
        del fp32
    out["ratio"] = out["int8"] / out["bfloat16"]
    out["ratio_above_torch"] = (out["int8"] - out["torch"]) / (out["bfloat16"] - out["torch"])
    return out


def models(fp32: GPT) -> dict[str, GPT]:
    bf16 = in_dtype(fp32, torch.bfloat16)
    out = {"ours bfloat16": bf16}
    for name, dtype in (("ours int8 (bfloat16 activations)", torch.bfloat16),
                        ("ours int8 (float32 activations)", torch.float32)):
        q = quantize_model(in_dtype(fp32, torch.float32), dtype=dtype)  # from the float32 weights
        q.tokenizer = fp32.tokenizer
        out[name] = q
    return out


async def bench_int8(fp32: GPT, hf, prompts: list[list[int]], new_tokens: int, rounds: int, clients: int,
                     q8_0: llama.Worker | None = None) -> dict:
    """The phase: rows {name: {tok_s, cpu_linear, greedy agreement}}, clients, weight bytes, ratios.
    q8_0: llama.cpp's q8_0 on the same weights, loaded (bench/llama.py's Worker; the caller closes
    it), timed in every round beside ours as ours are, so that the host's drift falls on both."""
    ours = models(fp32)
    engines = {name: await measure.started_engine(m, max_batch=max(clients, 1)) for name, m in ours.items()}
    ref_engine = await measure.started_engine(fp32, max_batch=1)
    ref = await measure.engine_greedy(ref_engine, prompts[0], new_tokens)
    await ref_engine.stop(drain=False)
    rows: dict[str, dict] = {name: {"tok_s": 0.0, "cpu_linear": e.cpu_linear} for name, e in engines.items()}
    rows["transformers float32"] = {"tok_s": 0.0}
    q8_runs: list[float] = []
    for _ in range(rounds):  # alternating, each keeping its best: the host's slumps fall on all of them
        for name, engine in engines.items():
            rate = await measure.engine_decode_tok_s(engine, prompts[0], new_tokens, 1)
            rows[name]["tok_s"] = max(rows[name]["tok_s"], rate)
        rate = measure.hf_decode_tok_s(hf, prompts[0], new_tokens, 1)
        rows["transformers float32"]["tok_s"] = max(rows["transformers float32"]["tok_s"], rate)
        if q8_0 is not None:
            try:
                q8_runs.append(q8_0.measure(prompts[0], new_tokens, 1)["tok_s"])
            except Exception as err:  # a crash costs the interleaved q8_0 row, not the phase
                log.warning("llama.cpp q8_0 in the int8 rounds: %s", err)
                q8_0 = None
        log.info("round: %s", {n: round(r["tok_s"], 1) for n, r in rows.items()})
    bf16_tokens = await measure.engine_greedy(engines["ours bfloat16"], prompts[0], new_tokens)
    for name, engine in engines.items():
        tokens = await measure.engine_greedy(engine, prompts[0], new_tokens)
        rows[name].update(agree_float32=agree(tokens, ref), agree_bfloat16=agree(tokens, bf16_tokens))
    served: dict[str, float] = {}
    for _ in range(min(rounds, 2) if clients else 0):  # alternating too, each keeping its best
        for name in ("ours bfloat16", "ours int8 (bfloat16 activations)"):
            run = await measure.in_process_clients(engines[name], prompts[:clients], new_tokens, 1)
            served[name] = max(served.get(name, 0.0), run.tokens / run.wall_s)
    for engine in engines.values():
        await engine.stop(drain=False)
    sizes = {shape: shape_weight_bytes(shape) for shape in SHAPES}
    try:
        torch_alone = probe_peak_rss()
        rss = {shape: shape_peak_rss(shape, torch_alone) for shape in SHAPES}
    except Exception as err:  # e.g. no GPT-2 tokenizer offline: the figures are lost, not the phase
        log.warning("peak RSS not measured: %s", err)
        rss = {}
    int8 = rows["ours int8 (bfloat16 activations)"]["tok_s"]
    ratios = {"int8_vs_bf16_b1": int8 / rows["ours bfloat16"]["tok_s"],
              "int8_f32_vs_bf16_b1": rows["ours int8 (float32 activations)"]["tok_s"] / rows["ours bfloat16"]["tok_s"],
              "int8_vs_hf_fp32_b1": int8 / rows["transformers float32"]["tok_s"],
              "int8_vs_bf16_weight_bytes": max(s["ratio"] for s in sizes.values())}
    if served:
        ratios["int8_vs_bf16_clients"] = served["ours int8 (bfloat16 activations)"] / served["ours bfloat16"]
    report = {"rows": rows, "clients": clients, "clients_tok_s": served, "weight_bytes": sizes, "peak_rss": rss,
              "ratios": ratios,
              "targets": TARGETS, "new_tokens": new_tokens, "of": new_tokens}
    if q8_runs:  # the same statistic as ours: the best round
        report["llama_q8_0"] = {"tok_s": max(q8_runs), "tok_s_runs": q8_runs, "interleaved": True}
        ratios["int8_vs_llama_q8_0_b1"] = int8 / max(q8_runs)
    return report


def add_llama_q8_0(report: dict, llama_cpp: dict) -> None:
    """llama.cpp's q8_0 batch-1 row of the same run (bench/llama.py) beside the int8 rows, and
    ours int8 against it; nothing where llama.cpp did not measure q8_0. Rounds interleaved with
    ours (bench_int8's q8_0) stand; the llama.cpp phase's own figure is used only without them."""
    q8 = llama_cpp.get("rows", {}).get("q8_0")
    if q8 is None:
        why = llama_cpp.get("skipped")
        report["llama_q8_0"] = {"skipped": why.get("q8_0") if isinstance(why, dict) else why}
        return
    if report.get("llama_q8_0", {}).get("interleaved"):
        report["llama_q8_0"].update(gguf_bytes=q8["gguf_bytes"], phase_tok_s=q8["tok_s"])
        return
    report["llama_q8_0"] = {"tok_s": q8["tok_s"], "gguf_bytes": q8["gguf_bytes"]}
    report["ratios"]["int8_vs_llama_q8_0_b1"] = report["rows"]["ours int8 (bfloat16 activations)"]["tok_s"] / q8["tok_s"]


def table(r: dict) -> str:
    lines = ["| row | batch-1 tok/s | CPU linear | greedy = float32 / bfloat16 (of %d) |" % r["of"], "|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['tok_s']:.1f} | {row.get('cpu_linear', '-')} | "
                     f"{row.get('agree_float32', '-')} / {row.get('agree_bfloat16', '-')} |")
    q8 = r.get("llama_q8_0", {})
    if "tok_s" in q8:
        how = "in the same rounds as ours" if q8.get("interleaved") else "its own phase of the run"
        lines.append(f"| llama.cpp q8_0 (same weights, {how}) | {q8['tok_s']:.1f} | | |")
    elif q8:
        lines.append(f"| llama.cpp q8_0 | not measured: {q8['skipped']} | | |")
    for name, rate in r["clients_tok_s"].items():
        lines.append(f"| {name}, {r['clients']} clients | {rate:.1f} (all clients) | | |")
    for shape, s in r["weight_bytes"].items():
        lines.append(f"| weight bytes {shape} | int8 {s['int8'] / 2**20:.1f} MiB, bfloat16 {s['bfloat16'] / 2**20:.1f} MiB"
                     f" ({s['ratio']:.3f}x) | | |")
    for shape, s in r.get("peak_rss", {}).items():
        lines.append(f"| peak RSS {shape} (load the export, 8 greedy tokens) | int8 {s['int8'] / 2**20:.0f} MiB, "
                     f"bfloat16 {s['bfloat16'] / 2**20:.0f} MiB ({s['ratio']:.3f}x; above torch's own "
                     f"{s['torch'] / 2**20:.0f} MiB: {s['ratio_above_torch']:.3f}x) | | |")
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f} (target {r['targets'][k]})" if k in r["targets"]
                                        else f"{k} {v:.2f}" for k, v in r["ratios"].items()))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-124M", choices=sorted(SHAPES))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--llama-cpp", action="store_true",
                   help="llama.cpp's q8_0 on the same weights in the same rounds (pip install '.[bench-llama]')")
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("model").setLevel(logging.WARNING)
    from bench.run import make_prompts
    tokenizer = gpt2_tokenizer(None)
    hf, fp32 = hf_and_ours(args.shape, tokenizer)
    prompts, _ = make_prompts(tokenizer, max(args.clients, 1), 64)  # bench/run.py's prompt length
    worker, llama_cpp = None, None
    if args.llama_cpp:
        keep = {"q8_0": None}
        llama_cpp = llama.bench(hf, prompts[0], args.new_tokens, 1, threads=torch.get_num_threads(), converter=None,
                                tokenizer_dir=None, reference_tokens=None, keep=keep, outtypes=("q8_0",))
        worker = keep["q8_0"]
    try:
        report = asyncio.run(bench_int8(fp32, hf, prompts, args.new_tokens, args.rounds, args.clients, q8_0=worker))
    finally:
        if worker is not None:
            worker.close()
    if llama_cpp is not None:
        add_llama_q8_0(report, llama_cpp)
    report["shape"] = args.shape
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
