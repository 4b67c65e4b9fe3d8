"""The benchmark: our engine against transformers (and optionally llama.cpp) on the same weights.

    python -m bench.run [--quick] [--device cpu|cuda] [--shapes gpt2-124M,gpt2-355M] [--llama-cpp] [--no-int8]

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import int8, llama, measure
from bench.models import SHAPES, demo_model, gpt2_tokenizer, hf_and_ours, in_dtype

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = (" the of and to in is that for it as was with be by on not he this are or his from at which but have"
         " an had they you were their one all we can her has there been if more when will would who so no").split(" ")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OVERHEAD_PAIRS = 3  # HTTP runs, each followed by its in-process replay (see bench_server_overhead)
# A client run around which the host ran below this share of its best speed in the run is taken
# again (up to SLUMP_ATTEMPTS runs in all), keeping the run with the faster host: the 1-, 8- and
# 32-client runs are compared with each other, and one run in a slump (2-8x slower here) made 32
# clients "14.7x" one. Batch-1 rounds in a slump are set aside alike (batch1_rounds).
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
    p.add_argument("--no-int8", action="store_true", help="skip int8 weights vs bfloat16 on CPU (bench/int8.py's phase)")
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


@dataclass
class ShapeRun:
    """What the phases of one shape's benchmark share: its settings, prompts and models, the host's
    speed probes, and the report (`out`) that each phase fills in."""

    args: argparse.Namespace
    device: torch.device
    new: int  # new tokens per request
    repeats: int
    rounds: int  # batch-1 rounds kept
    clients: list[int]
    dtypes: list[str]  # batch-1 dtypes
    serve_dtype: str  # the client runs' dtype
    prompts: list[list[int]]
    texts: list[str] | None  # the prompts as text; None without a tokenizer (no HTTP then)
    hf: Any  # transformers' GPT2LMHeadModel, in hf_dtype
    hf_dtype: torch.dtype
    ours: Any  # our GPT, float32
    out: dict
    probes: list[float] = field(default_factory=list)  # the host's speed around each batch-1 round and client run

    @property
    def per_client(self) -> int:
        """Requests per client: a GPU finishes 2 per client in a fraction of a second, so more there."""
        return 1 if self.args.quick else 2 if self.device.type == "cpu" else 8

    @property
    def warmup(self) -> int:
        """Warm-up requests per client, before the timed ones (on a GPU only)."""
        return 0 if self.device.type == "cpu" else 1

    def host_speed(self) -> float | None:
        if self.device.type != "cpu":  # on a GPU host the card does the work
            return None
        self.probes.append(measure.host_speed())
        return self.probes[-1]

    def slumped(self, speed: float | None) -> bool:
        return speed is not None and speed < SLUMP * max(self.probes)


@dataclass
class Batch1Rounds:
    """The batch-1 rounds' raw results: every transformers run in order, the rounds kept as
    (index of the transformers run before, {dtype: ours}, index after), and how many were set aside."""

    hf_runs: list[float] = field(default_factory=list)
    kept: list[tuple[int, dict[str, float], int]] = field(default_factory=list)
    set_aside: int = 0


def setup_shape(shape: str, args, tokenizer) -> ShapeRun:
    """Settings, prompts and both models of one shape, and this machine's ceilings for them."""
    device = torch.device(args.device)
    clients = [int(c) for c in args.clients.split(",")]
    dtypes = (args.dtypes or ("float32,bfloat16,float16" if device.type == "cpu" else "bfloat16,float16")).split(",")
    serve_dtype = args.serve_dtype or ("float32" if device.type == "cpu" else "bfloat16")
    prompts, texts = make_prompts(tokenizer, max(clients), 64)
    new = 16 if args.quick else 64
    out: dict = {"shape": shape, "new_tokens": new, "prompt_tokens": 64, "ceilings": {}, "batch1": {}, "clients": {}}
    hf, ours = hf_and_ours(shape, tokenizer)
    hf, ours = hf.to(device), ours.to(device)
    out["n_params"] = ours.num_params()
    hf_dtype = torch.float32 if device.type == "cpu" else DTYPES[serve_dtype]
    hf = hf.to(hf_dtype)
    # the ceilings first: on a GPU they also bring the clocks up before anything is timed
    out["ceilings"]["copy_GB_s"] = measure.copy_bandwidth(device) / 1e9
    for name in dict.fromkeys(dtypes + [serve_dtype]):
        out["ceilings"][f"matmul_{name}_GFLOP_s"] = measure.matmul_flops(DTYPES[name], device) / 1e9
    log.info("%s: %.0fM parameters; transformers batch-1 (%s)", shape, out["n_params"] / 1e6, hf_dtype)
    return ShapeRun(args=args, device=device, new=new, repeats=1 if args.quick else 2, rounds=1 if args.quick else 3,
                    clients=clients, dtypes=dtypes, serve_dtype=serve_dtype, prompts=prompts, texts=texts,
                    hf=hf, hf_dtype=hf_dtype, ours=ours, out=out)


async def batch1_rounds(run: ShapeRun, engines: dict) -> Batch1Rounds:
    """Batch 1 in rounds: transformers, then ours in each dtype, then transformers again, and so on.

    Each of our rates is later divided by the mean of the two transformers runs around it, and
    the ratio reported is the median over rounds: this host's speed drifts by 10-30% within
    minutes, and neighbours' ratios move far less than either rate alone. A round around which
    the host's speed (sampled between its runs) fell below SLUMP of its best is set aside and
    taken again, up to `rounds` times: in a slump of this host transformers once ran 6.4 tok/s
    between two runs of 20 and more."""
    prompt, b1 = run.prompts[0], Batch1Rounds()
    b1.hf_runs.append(measure.hf_decode_tok_s(run.hf, prompt, run.new, run.repeats))
    speeds = [run.host_speed()]
    while len(b1.kept) < run.rounds:
        ours_now = {}
        for name, engine in engines.items():
            ours_now[name] = await measure.engine_decode_tok_s(engine, prompt, run.new, run.repeats)
            speeds.append(run.host_speed())
        b1.hf_runs.append(measure.hf_decode_tok_s(run.hf, prompt, run.new, run.repeats))
        speeds.append(run.host_speed())
        if b1.set_aside < run.rounds and run.slumped(None if None in speeds else min(speeds)):
            b1.set_aside += 1
            log.info("batch-1 round set aside: the host at %.0f%% of its best", 100 * min(speeds) / max(run.probes))
            # its last transformers run may be slumped too: the next round starts with a fresh one
            b1.hf_runs.append(measure.hf_decode_tok_s(run.hf, prompt, run.new, run.repeats))
            speeds = [run.host_speed()]
        else:
            b1.kept.append((len(b1.hf_runs) - 2, ours_now, len(b1.hf_runs) - 1))
            speeds = speeds[-1:]
    return b1


async def bench_batch1(run: ShapeRun) -> list[int] | None:
    """Batch-1 decode, ours in each dtype against transformers; returns float32's greedy tokens
    (what the other dtypes and llama.cpp are compared with), None when float32 is not measured."""
    ours = run.ours
    models = {name: ours if DTYPES[name] == torch.float32 else in_dtype(ours, DTYPES[name]) for name in run.dtypes}
    engines = {}
    try:
        for name, model in models.items():
            engines[name] = await measure.started_engine(model, max_batch=1)
        b1 = await batch1_rounds(run, engines)
        tokens = {name: await measure.engine_greedy(engine, run.prompts[0], 32) for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            await engine.stop(drain=False)
    hf_rates = [b1.hf_runs[i] for i in sorted({i for b, _, a in b1.kept for i in (b, a)})]
    run.out["batch1"]["transformers"] = {"dtype": str(run.hf_dtype).removeprefix("torch."),
                                         "tok_s": statistics.median(hf_rates), "tok_s_runs": hf_rates}
    run.out["batch1_rounds_set_aside"] = b1.set_aside
    reference = tokens.get("float32")
    for name, model in models.items():
        run.out["batch1"][name] = batch1_row(run, model, b1, name, engines[name].cpu_linear,
                                             agreement(tokens[name], reference))
    return reference


def agreement(tokens: list[int], reference: list[int] | None) -> int | None:
    """How many leading tokens equal the reference's (None without one)."""
    if reference is None:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))


def batch1_row(run: ShapeRun, model, b1: Batch1Rounds, name: str, cpu_linear, agree: int | None) -> dict:
    """One dtype's batch-1 row: its rate, its ratio to transformers and its ceilings."""
    rates = [r[name] for _, r, _ in b1.kept]
    rate = statistics.median(rates)
    vs_hf = statistics.median(r[name] / ((b1.hf_runs[b] + b1.hf_runs[a]) / 2) for b, r, a in b1.kept)
    torch_ceiling = measure.batch1_ceiling(model, via="torch")
    bandwidth = measure.bandwidth_ceiling(model, run.out["ceilings"]["copy_GB_s"] * 1e9)
    if run.device.type == "cpu":  # the matrix-vector path the engine chose for this copy
        ceiling, bound = measure.batch1_ceiling(model, via="model"), "its path"
    else:  # torch's eager pass is bound by kernel launches there, not by the GPU
        ceiling, bound = bandwidth, "bandwidth"
    log.info("batch-1 %s: %.1f tok/s, %.2fx transformers (%s; ceiling %.1f, torch's %.1f)", name, rate, vs_hf,
             cpu_linear, ceiling, torch_ceiling)
    return {"tok_s": rate, "tok_s_runs": rates, "vs_transformers": vs_hf,
            "cpu_linear": cpu_linear, "ceiling_tok_s": ceiling,
            "ceiling_bound": bound, "torch_ceiling_tok_s": torch_ceiling, "of_ceiling": rate / ceiling,
            "bandwidth_bound_tok_s": bandwidth,
            "weight_GB_s": rate * measure.weight_bytes(model) / 1e9,
            "greedy_agrees_with_fp32_for": agree}


def bench_llama_cpp(run: ShapeRun, reference_tokens: list[int] | None) -> "llama.Worker | None":
    """The CPU peer, on the same weights, batch 1. Returns q8_0's worker, still loaded, for the
    int8 phase's rounds (the caller closes it), or None."""
    gc.collect()
    args = run.args
    keep = {"q8_0": None} if not args.no_int8 and run.device.type == "cpu" else None
    run.out["llama_cpp"] = llama.bench(run.hf, run.prompts[0], run.new, run.repeats, threads=torch.get_num_threads(),
                                       converter=args.llama_convert, tokenizer_dir=args.hf_tokenizer_dir,
                                       reference_tokens=reference_tokens, keep=keep)
    hf_rate = run.out["batch1"]["transformers"]["tok_s"]
    for kind, row in run.out["llama_cpp"].get("rows", {}).items():
        row["vs_transformers"] = row["tok_s"] / hf_rate
        mine = run.out["batch1"].get(llama.OURS_AT.get(kind, ""), {}).get("tok_s")
        if mine:
            row["ours_vs_llama"] = mine / row["tok_s"]
    return (keep or {}).get("q8_0")


async def serve(run: ShapeRun, model, c: int, via: str, arrivals: list[float] | None = None) -> tuple[dict, int]:
    """c clients on an engine of their own: over HTTP, streamed ("http") or not ("not
    streamed"), or "in-process" (all at once, or at `arrivals`; "sampled": all at once with the
    seed API's default sampling instead of greedy). Returns the run's summary
    (with "arrivals" over HTTP) and the engine's KV-cache bytes."""
    gc.collect()  # the previous engine's KV cache goes before the next one is allocated
    before = run.host_speed()
    engine = await measure.started_engine(model, max_batch=c)
    steps = engine.stats().total_steps
    if via in ("in-process", "sampled"):
        result = await measure.in_process_clients(engine, run.prompts[:c], run.new, run.per_client, run.warmup,
                                                  arrivals, sampled=via == "sampled")
        await engine.stop(drain=False)
    else:  # the server stops the engine
        result = await measure.http_clients(engine, run.texts[:c], run.new, run.per_client, run.warmup,
                                            stream=via == "http")
    summary = result.summary()
    if result.arrivals is not None:
        summary["arrivals"] = result.arrivals
    if not run.warmup:  # steps and time per step: arrivals spread over more steps, or slower steps
        steps = engine.stats().total_steps - steps
        summary.update(engine_steps=steps, ms_per_step=1e3 * result.wall_s / max(steps, 1))
    if before is not None:
        summary["host_speed"] = min(before, run.host_speed())
    return summary, engine.kv_cache_bytes


async def bench_clients(run: ShapeRun, model, via: str) -> None:
    """1, 8, 32 (--clients) concurrent clients; a run in a slump of the host is taken again."""
    for c in run.clients:  # KV-cache bytes: the largest run's, max_batch rows of block_size
        summary, run.out["kv_cache_bytes"] = await serve(run, model, c, via)
        for attempt in range(2, SLUMP_ATTEMPTS + 1):  # the ratios between these runs would measure the host
            if not run.slumped(summary.get("host_speed")):
                break
            log.info("%d clients (%s): %.1f tok/s with the host at %.0f%% of its best; again", c, via,
                     summary["tok_s"], 100 * summary["host_speed"] / max(run.probes))
            again, _ = await serve(run, model, c, via)
            summary = {**max(summary, again, key=lambda s: s["host_speed"]), "runs_taken": attempt}
        run.out["clients"][c] = summary
        log.info("%d clients (%s): %.1f tok/s", c, run.out["clients"][c]["via"], run.out["clients"][c]["tok_s"])


async def bench_server_overhead(run: ShapeRun, model) -> None:
    """The server's overhead: the largest load over HTTP against the same load in-process with
    each client starting when its HTTP twin reached the engine (over HTTP the clients arrive
    spread over the first steps, which the scheduler serves differently from a simultaneous
    start), in three pairs, each replay right after its HTTP run, so that the host's drift moves
    both sides of a pair alike: the overhead is the median over pairs, the rows report the mean
    of each side's runs (latencies: their first run). Then the load in-process all at once (the
    scheduler's best case), HTTP without an event per token, and with sampling."""
    out, top = run.out, max(run.clients)
    replay = f"{top} in-process, HTTP's arrivals"
    runs = {top: [out["clients"][top]], replay: []}
    # (two on a GPU: each engine there captures its graphs first, and gpu_check.sh has minutes)
    for pair in range(OVERHEAD_PAIRS if run.device.type == "cpu" else 2):
        if pair:
            runs[top].append((await serve(run, model, top, "http"))[0])
        runs[replay].append((await serve(run, model, top, "in-process", runs[top][-1]["arrivals"]))[0])
    out["server_overhead_pairs"] = [1 - h["tok_s"] / r["tok_s"] for h, r in zip(runs[top], runs[replay])]
    # ... and what the server's event loop took, which the host's noise does not move: a share
    # of the cores the engine computes on (on a GPU, of the one interpreter lock both share)
    loop = statistics.median(h["server_loop_cpu_cores"] for h in runs[top])
    out["server_loop_cpu_share"] = loop / (torch.get_num_threads() if run.device.type == "cpu" else 1)
    for key, summaries in runs.items():
        rates = [s["tok_s"] for s in summaries]
        out["clients"][key] = {**summaries[0], "tok_s": sum(rates) / len(rates), "tok_s_runs": rates}
        if run.probes:
            out["clients"][key]["host_speed"] = min(s["host_speed"] for s in summaries)
    out["clients"][f"{top} in-process"], _ = await serve(run, model, top, "in-process")
    out["clients"][f"{top} not streamed"], _ = await serve(run, model, top, "not streamed")
    # what sampling adds to a step (the rows above decode greedily, as the targets ask)
    out["clients"][f"{top} sampled"], _ = await serve(run, model, top, "sampled")


def bench_transformers_static(run: ShapeRun) -> None:
    """transformers' static-batch generate for each client count, and every client row's share of
    the GEMM ceiling."""
    hf, new = run.hf.to(DTYPES[run.serve_dtype]), run.new
    for c in run.clients:
        if c == 1:
            continue
        t = measure.hf_generate(hf, run.prompts[:c], new, 1)
        run.out["clients"][c]["transformers_static_tok_s"] = c * new / t
    matmul = run.out["ceilings"][f"matmul_{run.serve_dtype}_GFLOP_s"]
    for c, row in run.out["clients"].items():  # 2 FLOPs per parameter per token, prefill included
        row["of_matmul_ceiling"] = row["tok_s"] * (64 + new) / new * 2 * run.out["n_params"] / 1e9 / matmul


async def bench_shape(shape: str, args, tokenizer) -> dict:
    run = setup_shape(shape, args, tokenizer)
    reference_tokens = await bench_batch1(run)
    q8_0 = bench_llama_cpp(run, reference_tokens) if args.llama_cpp else None
    if not args.no_int8 and run.device.type == "cpu":
        try:
            run.out["int8"] = await int8.bench_int8(run.ours, run.hf, run.prompts, run.new, run.rounds,
                                                    max(run.clients), q8_0=q8_0)
        finally:
            if q8_0 is not None:
                q8_0.close()
        if "llama_cpp" in run.out:
            int8.add_llama_q8_0(run.out["int8"], run.out["llama_cpp"])
    # served throughput, in the serving dtype
    ours, serve_dtype = run.ours, DTYPES[run.serve_dtype]
    model = ours if serve_dtype == torch.float32 else in_dtype(ours, serve_dtype)
    why_not_http = "--no-http" if args.no_http else (
        "no GPT-2 tokenizer data" if run.texts is None else measure.server_available())
    run.out["clients_via"] = "http" if why_not_http is None else f"in-process ({why_not_http})"
    await bench_clients(run, model, "http" if why_not_http is None else "in-process")
    if why_not_http is None and max(run.clients) > 1:
        await bench_server_overhead(run, model)
    if run.probes:
        run.out["host_probes_per_s"] = run.probes
    del model
    bench_transformers_static(run)
    run.hf = run.ours = None
    return run.out


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
    """The report as markdown: a header line, one table with its notes per shape, and a footer."""
    lines = [f"Machine: {report['machine']}; torch {report['torch']}, {report['threads']} threads; "
             f"{report['date']}; commit {report.get('commit', 'unknown')}", ""]
    for r in report["shapes"]:
        lines += [f"### {r['shape']} ({r['n_params'] / 1e6:.0f}M params), prompt 64, {r['new_tokens']} new, greedy", "",
                  "| measurement | tok/s | vs reference | of ceiling |", "|---|---:|---:|---:|"]
        lines += batch1_lines(r) + llama_lines(r) + client_lines(r) + shape_notes(r)
        if r.get("int8"):
            lines += ["", "int8 weights (bench/int8.py):", "", int8.table(r["int8"]), ""]
    if report.get("demo"):
        lines.append(f"Demo model: {report['demo']}")
    lines += [f"llama.cpp: {report['llama_cpp']}", f"Load average at the end (1, 5, 15 min): {report['load_avg']}",
              f"Peak RSS: {report['peak_rss_MiB']:.0f} MiB"]
    return "\n".join(lines)


def batch1_lines(r: dict) -> list[str]:
    """transformers' batch-1 row, then ours in each dtype."""
    b1 = r["batch1"]
    t = b1["transformers"]
    aside = r.get("batch1_rounds_set_aside")
    aside = f"; {aside} round(s) set aside, the host slowed" if aside else ""
    lines = [f"| batch 1, transformers generate ({t['dtype']}; median of "
             f"{', '.join(f'{x:.1f}' for x in t['tok_s_runs'])}, around ours{aside}) | {t['tok_s']:.1f} | 1.00x | |"]
    for d, v in b1.items():
        if d != "transformers":
            agree = v["greedy_agrees_with_fp32_for"]
            note = "" if d == "float32" or agree is None else f" (greedy = fp32 for {agree}/32 tokens)"
            lines.append(f"| batch 1, ours {d}, {v['cpu_linear'] or 'torch'}{note} | {v['tok_s']:.1f} | "
                         f"{v['vs_transformers']:.2f}x | {v['of_ceiling']:.0%} of {v['ceiling_tok_s']:.0f} "
                         f"({v['ceiling_bound']}; torch F.linear pass: "
                         f"{v['torch_ceiling_tok_s']:.0f}) |")
    return lines


def llama_lines(r: dict) -> list[str]:
    lines = []
    for k, v in r.get("llama_cpp", {}).get("rows", {}).items():
        agree = v["greedy_agrees_with_fp32_for"]
        note = "" if agree is None else f" (greedy = ours fp32 for {agree}/{v['compared_tokens']} tokens)"
        ours = f"; ours {llama.OURS_AT[k]} = {v['ours_vs_llama']:.2f}x this" if "ours_vs_llama" in v else ""
        lines.append(f"| batch 1, llama.cpp {k}{note} | {v['tok_s']:.1f} | {v['vs_transformers']:.2f}x{ours} | |")
    return lines


def client_lines(r: dict) -> list[str]:
    """One row per client run: its rate, latencies, and what it is compared with."""
    lines = []
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
    return lines


def shape_notes(r: dict) -> list[str]:
    """The lines under a shape's table: bandwidth bound, ceilings, and the targets."""
    b1, c, hf = r["batch1"], r["ceilings"], r["batch1"]["transformers"]["tok_s"]
    # every weight read once per token at the copy bandwidth: a GPU's batch-1 bound; on a CPU
    # reads alone outrun a copy (the Xeon: 20-26 GB/s of weights read against a 15-19 GB/s copy)
    ours = {d: v for d, v in b1.items() if "bandwidth_bound_tok_s" in v}
    lines = ["", "Every weight read once per token at the copy bandwidth (read + write): " + ", ".join(
        f"{d} {v['bandwidth_bound_tok_s']:.0f} tok/s = {v['bandwidth_bound_tok_s'] / hf:.2f}x transformers"
        for d, v in ours.items()) + ". Weights read by our batch-1 decode: " + ", ".join(
        f"{d} {v['weight_GB_s']:.1f} GB/s" for d, v in ours.items()) + "."]
    lines += ["", f"Ceilings: copy {c['copy_GB_s']:.1f} GB/s; GEMM " +
              ", ".join(f"{k.split('_')[1]} {v:.0f} GFLOP/s" for k, v in c.items() if k.startswith("matmul")) +
              f". Clients via: {r['clients_via']}. KV cache {r.get('kv_cache_bytes', 0) / 2**20:.0f} MiB.", ""]
    lines.append("Targets: " + ", ".join(
        f"{k} {v:.2f} (target {TARGETS[k]})" if k in TARGETS else f"{k} {v:+.0%}" for k, v in r["ratios"].items()))
    lines.append("")
    return lines


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
