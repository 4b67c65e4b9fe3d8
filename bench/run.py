"""The benchmark: our engine against transformers (and optionally llama.cpp) on the same weights.

    python -m bench.run [--quick] [--device cpu|cuda] [--shapes gpt2-124M,gpt2-355M] [--llama-cpp]

One run measures, for each model shape: this machine's ceilings (GEMM FLOP/s, copy
bandwidth, the batch-1 bound: on CPU one matrix-vector pass over all weights by the engine's
path, on a GPU reading every weight once at the copy bandwidth; torch's F.linear pass beside it);
batch-1 decode tokens/s, ours in each dtype vs transformers' generate(use_cache=True); served
throughput with 1/8/32 concurrent clients (64-token prompts, 64 new tokens, greedy) over HTTP
when server/ is importable, the clients in a process of their own (bench/load.py), else
in-process (the table says which), vs transformers' static-batch generate and vs one request
at a time, and the largest count also in-process (with each client starting when its HTTP twin
reached the engine: what the server costs; and all at once: what spread arrivals cost the
scheduler) and over HTTP without streaming (what an event per token adds); peak RSS and KV-cache bytes; and the
demo model's batch-1 speed. It prints a markdown table and writes bench/results/*.json.

--llama-cpp adds llama.cpp (llama-cpp-python) on the same random weights, converted to GGUF
in f32, f16 and q8_0, batch 1, timed as ours is (see bench/llama.py). It needs, once:

    pip install '.[bench-llama]'   # builds llama.cpp from PyPI's source package: minutes, not in CI

plus GPT-2's vocab.json and merges.txt (--hf-tokenizer-dir; ../shared/tokenizers when present)
and llama.cpp's convert_hf_to_gguf.py (--llama-convert; else fetched from the source package of
the installed version with pip). Without them the table says why it skipped llama.cpp.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import logging
import os
import platform
import random
import resource
import statistics
import subprocess
from pathlib import Path

import torch

from bench import llama, measure
from bench.models import SHAPES, demo_model, gpt2_tokenizer, hf_and_ours, in_dtype

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = (" the of and to in is that for it as was with be by on not he this are or his from at which but have"
         " an had they you were their one all we can her has there been if more when will would who so no").split(" ")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OVERHEAD_PAIRS = 3  # HTTP runs, each followed by its in-process replay (see bench_shape)
# A client run around which the host ran below this share of its best speed in the run is taken
# again (up to SLUMP_ATTEMPTS runs in all), keeping the run with the faster host: the 1-, 8- and
# 32-client runs are compared with each other, and one run in a slump (2-8x slower here) made 32
# clients "14.7x" one. Batch-1 rounds in a slump are set aside alike (bench_shape).
SLUMP = 0.75
SLUMP_ATTEMPTS = 3  # slumps last for minutes here: one retry of a 1-client run fell into the same one
TARGETS = {"b1_fp32_vs_hf": 1.4, "b1_best_half_vs_hf": 3.0, "c32_vs_hf_static": 0.9, "c32_vs_one_at_a_time": 5.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="--llama-cpp needs llama-cpp-python: pip install '.[bench-llama]' "
                                       "(builds llama.cpp from source, a few minutes; not in dev/CI)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="gpt2-124M", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--dtypes", default=None, help="batch-1 dtypes (default: all three on cpu, bf16,fp16 on cuda)")
    p.add_argument("--serve-dtype", default=None, help="dtype of the client runs (default float32 cpu, bfloat16 cuda)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-http", action="store_true", help="measure clients in-process even if server/ imports")
    p.add_argument("--no-demo", action="store_true")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also measure llama.cpp on the same weights (pip install '.[bench-llama]' first)")
    p.add_argument("--llama-convert", default=None,
                   help="llama.cpp's convert_hf_to_gguf.py (or its folder), e.g. an unpacked llama-cpp-python "
                        "sdist's vendor/llama.cpp; default: fetched from the installed version's sdist")
    p.add_argument("--hf-tokenizer-dir", default=None,
                   help="folder with GPT-2's vocab.json and merges.txt, for the GGUF vocabulary "
                        "(default ../shared/tokenizers beside the repo when present)")
    p.add_argument("--tokenizer-path", default=None, help="GPT-2 .tiktoken ranks file")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<time>.json)")
    return p.parse_args(argv)


def make_prompts(tokenizer, n: int, length: int) -> tuple[list[list[int]], list[str] | None]:
    """n different prompts of exactly `length` tokens: words that are one GPT-2 token each
    (so the server's tokenization of the text gives the same ids); random ids without a tokenizer."""
    rng = random.Random(0)
    try:
        vocab = [w for w in WORDS if len(tokenizer.encode(" " + w)) == 1]
        texts = ["".join(" " + rng.choice(vocab) for _ in range(length)) for _ in range(n)]
        ids = [tokenizer.encode(t) for t in texts]
        if all(len(i) == length for i in ids):
            return ids, texts
    except NotImplementedError:
        pass
    return [[rng.randrange(50000) for _ in range(length)] for _ in range(n)], None


async def bench_shape(shape: str, args, tokenizer) -> dict:
    device = torch.device(args.device)
    new = 16 if args.quick else 64
    repeats = 1 if args.quick else 2
    rounds = 1 if args.quick else 3
    clients = [int(c) for c in args.clients.split(",")]
    dtypes = (args.dtypes or ("float32,bfloat16,float16" if device.type == "cpu" else "bfloat16,float16")).split(",")
    serve_dtype = args.serve_dtype or ("float32" if device.type == "cpu" else "bfloat16")
    prompts, texts = make_prompts(tokenizer, max(clients), 64)
    out: dict = {"shape": shape, "new_tokens": new, "prompt_tokens": 64, "ceilings": {}, "batch1": {}, "clients": {}}

    hf, ours = hf_and_ours(shape, tokenizer)
    hf, ours = hf.to(device), ours.to(device)
    n_params = ours.num_params()
    out["n_params"] = n_params
    hf_dtype = torch.float32 if device.type == "cpu" else DTYPES[serve_dtype]
    hf = hf.to(hf_dtype)
    # the ceilings first: on a GPU they also bring the clocks up before anything is timed
    out["ceilings"]["copy_GB_s"] = measure.copy_bandwidth(device) / 1e9
    for name in dict.fromkeys(dtypes + [serve_dtype]):
        out["ceilings"][f"matmul_{name}_GFLOP_s"] = measure.matmul_flops(DTYPES[name], device) / 1e9
    log.info("%s: %.0fM parameters; transformers batch-1 (%s)", shape, n_params / 1e6, hf_dtype)
    # Batch 1 in rounds: transformers, then ours in each dtype, then transformers again, and
    # so on; each of our rates is divided by the mean of the two transformers runs around it,
    # and the ratio reported is the median over rounds. This host's speed drifts by 10-30%
    # within minutes, and neighbours' ratios move far less than either rate alone.
    # A round around which the host's speed (sampled between its runs) fell below SLUMP of its
    # best is set aside and taken again, up to `rounds` times: in a slump of this host
    # transformers once ran 6.4 tok/s between two runs of 20 and more.
    models = {name: ours if DTYPES[name] == torch.float32 else in_dtype(ours, DTYPES[name]) for name in dtypes}
    probes: list[float] = []  # the host's speed around each batch-1 round and client run (CPU only)

    def host_speed() -> float | None:
        if device.type != "cpu":  # on a GPU host the card does the work
            return None
        probes.append(measure.host_speed())
        return probes[-1]

    def slumped(speed: float | None) -> bool:
        return speed is not None and speed < SLUMP * max(probes)

    engines, hf_runs, kept, set_aside = {}, [], [], 0  # kept: (hf_runs index before, {dtype: ours}, index after)
    try:
        for name, model in models.items():
            engines[name] = await measure.started_engine(model, max_batch=1)
        hf_runs.append(measure.hf_decode_tok_s(hf, prompts[0], new, repeats))
        speeds = [host_speed()]
        while len(kept) < rounds:
            ours_now = {}
            for name, engine in engines.items():
                ours_now[name] = await measure.engine_decode_tok_s(engine, prompts[0], new, repeats)
                speeds.append(host_speed())
            hf_runs.append(measure.hf_decode_tok_s(hf, prompts[0], new, repeats))
            speeds.append(host_speed())
            if set_aside < rounds and slumped(None if None in speeds else min(speeds)):
                set_aside += 1
                log.info("batch-1 round set aside: the host at %.0f%% of its best", 100 * min(speeds) / max(probes))
                # its last transformers run may be slumped too: the next round starts with a fresh one
                hf_runs.append(measure.hf_decode_tok_s(hf, prompts[0], new, repeats))
                speeds = [host_speed()]
            else:
                kept.append((len(hf_runs) - 2, ours_now, len(hf_runs) - 1))
                speeds = speeds[-1:]
        tokens = {name: await measure.engine_greedy(engine, prompts[0], 32) for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            await engine.stop(drain=False)
    hf_rates = [hf_runs[i] for i in sorted({i for b, _, a in kept for i in (b, a)})]
    out["batch1"]["transformers"] = {"dtype": str(hf_dtype).removeprefix("torch."),
                                     "tok_s": statistics.median(hf_rates), "tok_s_runs": hf_rates}
    out["batch1_rounds_set_aside"] = set_aside
    reference_tokens = tokens.get("float32")
    for name, model in models.items():
        rates = [r[name] for _, r, _ in kept]
        rate = statistics.median(rates)
        vs_hf = statistics.median(r[name] / ((hf_runs[b] + hf_runs[a]) / 2) for b, r, a in kept)
        torch_ceiling = measure.batch1_ceiling(model, via="torch")
        bandwidth = measure.bandwidth_ceiling(model, out["ceilings"]["copy_GB_s"] * 1e9)
        if device.type == "cpu":  # the matrix-vector path the engine chose for this copy
            ceiling, bound = measure.batch1_ceiling(model, via="model"), "its path"
        else:  # torch's eager pass is bound by kernel launches there, not by the GPU
            ceiling, bound = bandwidth, "bandwidth"
        agree = None if reference_tokens is None else next(
            (i for i, (a, b) in enumerate(zip(tokens[name], reference_tokens)) if a != b), len(tokens[name]))
        out["batch1"][name] = {"tok_s": rate, "tok_s_runs": rates, "vs_transformers": vs_hf,
                               "cpu_linear": engines[name].cpu_linear, "ceiling_tok_s": ceiling,
                               "ceiling_bound": bound, "torch_ceiling_tok_s": torch_ceiling, "of_ceiling": rate / ceiling,
                               "bandwidth_bound_tok_s": bandwidth,
                               "weight_GB_s": rate * measure.weight_bytes(model) / 1e9,
                               "greedy_agrees_with_fp32_for": agree}
        log.info("batch-1 %s: %.1f tok/s, %.2fx transformers (%s; ceiling %.1f, torch's %.1f)", name, rate, vs_hf,
                 engines[name].cpu_linear, ceiling, torch_ceiling)
    del models, engines, model

    if args.llama_cpp:  # the CPU peer, on the same weights, batch 1
        gc.collect()
        out["llama_cpp"] = llama.bench(hf, prompts[0], new, repeats, threads=torch.get_num_threads(),
                                       converter=args.llama_convert, tokenizer_dir=args.hf_tokenizer_dir,
                                       reference_tokens=reference_tokens)
        hf_rate = out["batch1"]["transformers"]["tok_s"]
        for kind, row in out["llama_cpp"].get("rows", {}).items():
            row["vs_transformers"] = row["tok_s"] / hf_rate
            mine = out["batch1"].get(llama.OURS_AT.get(kind, ""), {}).get("tok_s")
            if mine:
                row["ours_vs_llama"] = mine / row["tok_s"]

    # served throughput, in the serving dtype
    model = ours if DTYPES[serve_dtype] == torch.float32 else in_dtype(ours, DTYPES[serve_dtype])
    why_not_http = "--no-http" if args.no_http else (
        "no GPT-2 tokenizer data" if texts is None else measure.server_available())
    out["clients_via"] = "http" if why_not_http is None else f"in-process ({why_not_http})"
    # a GPU finishes 2 requests per client in a fraction of a second: more, after a warm-up round
    per_client = 1 if args.quick else 2 if device.type == "cpu" else 8
    warmup = 0 if device.type == "cpu" else 1
    async def serve(c: int, via: str, arrivals: list[float] | None = None) -> tuple[dict, int]:
        """c clients on an engine of their own: over HTTP, streamed ("http") or not ("not
        streamed"), or "in-process" (all at once, or at `arrivals`; "sampled": all at once with the
        seed API's default sampling instead of greedy). Returns the run's summary
        (with "arrivals" over HTTP) and the engine's KV-cache bytes."""
        gc.collect()  # the previous engine's KV cache goes before the next one is allocated
        before = host_speed()
        engine = await measure.started_engine(model, max_batch=c)
        steps = engine.stats().total_steps
        if via in ("in-process", "sampled"):
            run = await measure.in_process_clients(engine, prompts[:c], new, per_client, warmup, arrivals,
                                                   sampled=via == "sampled")
            await engine.stop(drain=False)
        else:  # the server stops the engine
            run = await measure.http_clients(engine, texts[:c], new, per_client, warmup, stream=via == "http")
        summary = run.summary()
        if run.arrivals is not None:
            summary["arrivals"] = run.arrivals
        if not warmup:  # steps and time per step: arrivals spread over more steps, or slower steps
            steps = engine.stats().total_steps - steps
            summary.update(engine_steps=steps, ms_per_step=1e3 * run.wall_s / max(steps, 1))
        if before is not None:
            summary["host_speed"] = min(before, host_speed())
        return summary, engine.kv_cache_bytes

    for c in clients:  # KV-cache bytes: the largest run's, max_batch rows of block_size
        via = "http" if why_not_http is None else "in-process"
        summary, out["kv_cache_bytes"] = await serve(c, via)
        for attempt in range(2, SLUMP_ATTEMPTS + 1):  # the ratios between these runs would measure the host
            if not slumped(summary.get("host_speed")):
                break
            log.info("%d clients (%s): %.1f tok/s with the host at %.0f%% of its best; again", c, via,
                     summary["tok_s"], 100 * summary["host_speed"] / max(probes))
            again, _ = await serve(c, via)
            summary = {**max(summary, again, key=lambda s: s["host_speed"]), "runs_taken": attempt}
        out["clients"][c] = summary
        log.info("%d clients (%s): %.1f tok/s", c, out["clients"][c]["via"], out["clients"][c]["tok_s"])
    if why_not_http is None and max(clients) > 1:
        # The server's overhead: the largest load over HTTP against the same load in-process with
        # each client starting when its HTTP twin reached the engine (over HTTP the clients
        # arrive spread over the first steps, which the scheduler serves differently from a
        # simultaneous start), in three pairs, each replay right after its HTTP run, so that
        # the host's drift moves both sides of a pair alike: the overhead is the median over
        # pairs, the rows report the mean of each side's runs (latencies: their first run).
        # Then the load in-process all at once (the scheduler's best case), and HTTP without
        # an event per token.
        top = max(clients)
        replay = f"{top} in-process, HTTP's arrivals"
        runs = {top: [out["clients"][top]], replay: []}
        # (two on a GPU: each engine there captures its graphs first, and gpu_check.sh has minutes)
        for pair in range(OVERHEAD_PAIRS if device.type == "cpu" else 2):
            if pair:
                runs[top].append((await serve(top, "http"))[0])
            runs[replay].append((await serve(top, "in-process", runs[top][-1]["arrivals"]))[0])
        out["server_overhead_pairs"] = [1 - h["tok_s"] / r["tok_s"] for h, r in zip(runs[top], runs[replay])]
        # ... and what the server's event loop took, which the host's noise does not move: a share
        # of the cores the engine computes on (on a GPU, of the one interpreter lock both share)
        loop = statistics.median(h["server_loop_cpu_cores"] for h in runs[top])
        out["server_loop_cpu_share"] = loop / (torch.get_num_threads() if device.type == "cpu" else 1)
        for key, summaries in runs.items():
            rates = [s["tok_s"] for s in summaries]
            out["clients"][key] = {**summaries[0], "tok_s": sum(rates) / len(rates), "tok_s_runs": rates}
            if probes:
                out["clients"][key]["host_speed"] = min(s["host_speed"] for s in summaries)
        out["clients"][f"{top} in-process"], _ = await serve(top, "in-process")
        out["clients"][f"{top} not streamed"], _ = await serve(top, "not streamed")
        # what sampling adds to a step (the rows above decode greedily, as the targets ask)
        out["clients"][f"{top} sampled"], _ = await serve(top, "sampled")

    if probes:
        out["host_probes_per_s"] = probes
    hf = hf.to(DTYPES[serve_dtype])
    for c in clients:
        if c == 1:
            continue
        t = measure.hf_generate(hf, prompts[:c], new, 1)
        out["clients"][c]["transformers_static_tok_s"] = c * new / t
    matmul = out["ceilings"][f"matmul_{serve_dtype}_GFLOP_s"]
    for c, row in out["clients"].items():  # 2 FLOPs per parameter per token, prefill included
        row["of_matmul_ceiling"] = row["tok_s"] * (64 + new) / new * 2 * n_params / 1e9 / matmul
    del hf
    return out


def llama_cpp_note(report: dict) -> str:
    notes = []
    for r in report["shapes"]:
        lc = r.get("llama_cpp")
        if lc is None:
            continue
        if isinstance(lc["skipped"], str):
            notes.append(f"{r['shape']} skipped: {lc['skipped']}")
            continue
        notes.append(f"{r['shape']}: llama-cpp-python {lc['version']}, {lc['threads']} threads" +
                     "".join(f"; {k} skipped: {why}" for k, why in lc["skipped"].items()))
    return "; ".join(notes) or "no shape measured"


def ratios(r: dict) -> dict:
    """The issue's targets, measured."""
    b1 = r["batch1"]
    hf = b1["transformers"]["tok_s"]
    out = {}
    if "float32" in b1:
        out["b1_fp32_vs_hf"] = b1["float32"]["vs_transformers"]
    half = [b1[d]["vs_transformers"] for d in ("bfloat16", "float16") if d in b1]
    if half:
        out["b1_best_half_vs_hf"] = max(half)
    cl = r["clients"]
    top = max(k for k in cl if isinstance(k, int))
    if "transformers_static_tok_s" in cl[top]:
        out["c32_vs_hf_static"] = cl[top]["tok_s"] / cl[top]["transformers_static_tok_s"]
    if 1 in cl and top != 1:
        out["c32_vs_one_at_a_time"] = cl[top]["tok_s"] / cl[1]["tok_s"]
    key = f"{top} in-process, HTTP's arrivals"
    if key in cl:
        out["server_overhead"] = statistics.median(r["server_overhead_pairs"])
        if "server_loop_cpu_share" in r:
            out["server_loop_cpu_share"] = r["server_loop_cpu_share"]
        if f"{top} not streamed" in cl:
            out["server_overhead_not_streamed"] = 1 - cl[f"{top} not streamed"]["tok_s"] / cl[key]["tok_s"]
        if f"{top} in-process" in cl:  # what the spread arrivals cost the scheduler
            out["spread_arrivals_cost"] = 1 - cl[key]["tok_s"] / cl[f"{top} in-process"]["tok_s"]
    return out


def table(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; torch {report['torch']}, {report['threads']} threads; "
             f"{report['date']}; commit {report.get('commit', 'unknown')}", ""]
    for r in report["shapes"]:
        c = r["ceilings"]
        lines += [f"### {r['shape']} ({r['n_params'] / 1e6:.0f}M params), prompt 64, {r['new_tokens']} new, greedy", "",
                  "| measurement | tok/s | vs reference | of ceiling |", "|---|---:|---:|---:|"]
        b1, hf = r["batch1"], r["batch1"]["transformers"]["tok_s"]
        t = b1["transformers"]
        aside = r.get("batch1_rounds_set_aside")
        aside = f"; {aside} round(s) set aside, the host slowed" if aside else ""
        lines.append(f"| batch 1, transformers generate ({t['dtype']}; median of "
                     f"{', '.join(f'{x:.1f}' for x in t['tok_s_runs'])}, around ours{aside}) | {hf:.1f} | 1.00x | |")
        for d, v in b1.items():
            if d != "transformers":
                agree = v["greedy_agrees_with_fp32_for"]
                note = "" if d == "float32" or agree is None else f" (greedy = fp32 for {agree}/32 tokens)"
                lines.append(f"| batch 1, ours {d}, {v['cpu_linear'] or 'torch'}{note} | {v['tok_s']:.1f} | "
                             f"{v['vs_transformers']:.2f}x | {v['of_ceiling']:.0%} of {v['ceiling_tok_s']:.0f} "
                             f"({v['ceiling_bound']}; torch F.linear pass: "
                             f"{v['torch_ceiling_tok_s']:.0f}) |")
        for k, v in r.get("llama_cpp", {}).get("rows", {}).items():
            agree = v["greedy_agrees_with_fp32_for"]
            note = "" if agree is None else f" (greedy = ours fp32 for {agree}/{v['compared_tokens']} tokens)"
            ours = f"; ours {llama.OURS_AT[k]} = {v['ours_vs_llama']:.2f}x this" if "ours_vs_llama" in v else ""
            lines.append(f"| batch 1, llama.cpp {k}{note} | {v['tok_s']:.1f} | {v['vs_transformers']:.2f}x{ours} | |")
        one = r["clients"].get(1, {}).get("tok_s")
        for k, v in r["clients"].items():
            ref = []
            if "transformers_static_tok_s" in v:
                ref.append(f"{v['tok_s'] / v['transformers_static_tok_s']:.2f}x HF static "
                           f"({v['transformers_static_tok_s']:.0f})")
            if one and k != 1:
                ref.append(f"{v['tok_s'] / one:.1f}x one-at-a-time")
            ttft = "" if "not streamed" in v["via"] else f", TTFT p50 {v['p50_ttft_s']:.2f}s"
            if "engine_steps" in v:
                ttft += f", {v['engine_steps']} steps of {v['ms_per_step']:.0f} ms"
            if v.get("client_cpu_cores") is not None:  # what the load generator took from the server
                ttft += f", clients' CPU {v['client_cpu_cores']:.2f} cores"
            if v.get("server_loop_cpu_cores") is not None:  # what serving HTTP took from the engine
                ttft += f", server's event loop {v['server_loop_cpu_cores']:.2f} cores"
            if v.get("host_speed") is not None:  # the slowest the host was around this row's runs
                ttft += f", host at {v['host_speed'] / max(r['host_probes_per_s']):.0%} of its best"
            runs = f", mean of {' and '.join(f'{x:.1f}' for x in v['tok_s_runs'])}" if "tok_s_runs" in v else ""
            lines.append(f"| {str(k).split()[0]} clients ({v['via']}{runs}): p50 {v['p50_latency_s']:.2f}s, "
                         f"p99 {v['p99_latency_s']:.2f}s{ttft} | {v['tok_s']:.1f} | {'; '.join(ref)} | "
                         f"{v['of_matmul_ceiling']:.0%} of GEMM |")
        # every weight read once per token at the copy bandwidth: a GPU's batch-1 bound; on a CPU
        # reads alone outrun a copy (the Xeon: 20-26 GB/s of weights read against a 15-19 GB/s copy)
        ours = {d: v for d, v in b1.items() if "bandwidth_bound_tok_s" in v}
        lines += ["", "Every weight read once per token at the copy bandwidth (read + write): " + ", ".join(
            f"{d} {v['bandwidth_bound_tok_s']:.0f} tok/s = {v['bandwidth_bound_tok_s'] / hf:.2f}x transformers"
            for d, v in ours.items()) + ". Weights read by our batch-1 decode: " + ", ".join(
            f"{d} {v['weight_GB_s']:.1f} GB/s" for d, v in ours.items()) + "."]
        lines += ["", f"Ceilings: copy {c['copy_GB_s']:.1f} GB/s; GEMM " +
                  ", ".join(f"{k.split('_')[1]} {v:.0f} GFLOP/s" for k, v in c.items() if k.startswith("matmul")) +
                  f". Clients via: {r['clients_via']}. KV cache {r.get('kv_cache_bytes', 0) / 2**20:.0f} MiB.", ""]
        lines.append("Targets: " + ", ".join(
            f"{k} {v:.2f} (target {TARGETS[k]})" if k in TARGETS else f"{k} {v:+.0%}" for k, v in r["ratios"].items()))
        lines.append("")
    if report.get("demo"):
        lines.append(f"Demo model: {report['demo']}")
    lines += [f"llama.cpp: {report['llama_cpp']}", f"Load average at the end (1, 5, 15 min): {report['load_avg']}",
              f"Peak RSS: {report['peak_rss_MiB']:.0f} MiB"]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """The checkout's commit (with "+changes" when the tree differs from it), or "unknown" outside git:
    a figure is only worth as much as knowing which code made it. BENCH_COMMIT names it for a copy
    without .git (bench/gpu_prepare.sh writes it for the GPU machine)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


async def run(args) -> dict:
    tokenizer = gpt2_tokenizer(args.tokenizer_path)
    device = args.device
    machine = (torch.cuda.get_device_name() if device.startswith("cuda")
               else f"{cpu_name()}, {os.cpu_count()} cores")
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": commit(), "machine": machine,
              "device": device,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick, "shapes": []}
    for shape in args.shapes.split(","):
        r = await bench_shape(shape, args, tokenizer)
        r["ratios"] = ratios(r)
        report["shapes"].append(r)
    if not args.no_demo:
        model, why = demo_model()
        if model is not None:
            engine = await measure.started_engine(model.to(device), max_batch=1)
            prompt = model.tokenizer.encode("The ")
            rate = await measure.engine_decode_tok_s(engine, prompt, 16 if args.quick else 100, 1)
            await engine.stop(drain=False)
            why = f"{rate:.0f} tok/s batch 1 ({model.num_params() / 1e6:.1f}M params, {model.config})"
        report["demo"] = why
    report["llama_cpp"] = llama_cpp_note(report) if args.llama_cpp else "not requested (--llama-cpp)"
    report["load_avg"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    report["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("server").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = asyncio.run(run(args))
    RESULTS.mkdir(exist_ok=True)
    stamp = report["date"].replace(":", "")
    path = Path(args.out) if args.out else RESULTS / f"{args.device.split(':')[0]}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
