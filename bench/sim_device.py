"""A simulated device: the engine's forward replaced by a sleep that releases the interpreter
lock (0.9 ms by default, about an H100's batch-32 decode graph for GPT-2 124M), so that what
is left is the host's work per step. The simulated device runs a step in the background like a
GPU: the runner's launch returns at once and its read waits for the step's end, so that async
scheduling (ASYNC_SCHEDULING) can hide the host's work behind it. Reports tokens/s over HTTP
against in-process, for the engine in the server's process and in a process of its own
(ENGINE_PROCESS), each with async scheduling off and on, and the device's wait per step: how
long it sat idle between two simulated forwards, waiting for the host, while the engine was busy.

    python -m bench.sim_device [--clients 16] [--new 64] [--per-client 2] [--step-ms 0.9] [--async on|off|both]

Not part of `make bench`; the figures depend on the host's free cores (docs/engine-process.md).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import logging
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench import measure
from model.engine import Engine, EngineConfig
from model.engine.client import EngineClient
from model.engine.protocol import CoreSpec
from model.export import save_export
from model.gpt import GPT, GPTConfig

ITOS = [chr(c) for c in range(32, 127)]
IDLE_GAP_S = 0.05  # a longer gap between forwards is the engine waiting for work, not host time


@dataclass
class SimStep:
    """What the engine holds between launch and read (as model/engine/runner.Launched)."""
    plan: object
    scores: object
    ends: float  # when the simulated device finishes it


class SimDevice:
    """Replaces the runner's launch and read: a step takes `step_s` of a device that runs one step
    at a time, in order; every decoding row samples token 1."""

    def __init__(self, step_s: float):
        self.step_s, self.steps, self.idle_s, self._free_at = step_s, 0, 0.0, None

    def launch(self, plan, scores=None) -> SimStep:
        now = time.perf_counter()
        if plan.decode is None and not plan.prefill:
            return SimStep(plan, scores, now)
        if self._free_at is not None and 0 <= now - self._free_at < IDLE_GAP_S:
            self.idle_s += now - self._free_at  # the device waited this long for the host
        self._free_at = max(now, self._free_at or now) + self.step_s
        self.steps += 1
        return SimStep(plan, scores, self._free_at)

    def read(self, launched: SimStep) -> list[int]:
        wait = launched.ends - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # releases the interpreter lock, as a device wait does
        d = launched.plan.decode
        return [1] * len(d.rows) if d is not None else []

    def report(self) -> dict:
        return {"steps": self.steps, "device_wait_ms_per_step": 1e3 * self.idle_s / max(self.steps, 1)}


def simulate(engine: Engine, step_s: float, report: str | None = None) -> SimDevice:
    """Install the simulated device on `engine` (CoreSpec.prepare in the core process; there
    its figures are written to `report` when the process exits)."""
    sim = SimDevice(step_s)
    engine.runner.launch, engine.runner.read = sim.launch, sim.read
    if report is not None:
        atexit.register(lambda: Path(report).write_text(json.dumps(sim.report())))
    return sim


async def one_mode(mode: str, ckpt: Path, cfg: EngineConfig, args, texts, prompts) -> dict:
    step_s = args.step_ms / 1e3
    report = Path(tempfile.mkdtemp()) / "sim.json"
    if mode.startswith("remote"):
        engine = EngineClient(CoreSpec(str(ckpt), device="cpu", dtype="float32", engine=cfg,
                                       prepare=("bench.sim_device:simulate", {"step_s": step_s, "report": str(report)})))
        sim = None
    else:
        from model import load_model_from_checkpoint

        engine = Engine(load_model_from_checkpoint(ckpt, device="cpu", dtype="float32"), cfg)
        sim = simulate(engine, step_s)
    await engine.start()
    if mode.endswith("in-process clients"):
        run = await measure.in_process_clients(engine, prompts, args.new, args.per_client, warmup=1)
        await engine.stop(drain=False)
    else:
        run = await measure.http_clients(engine, texts, args.new, args.per_client, warmup=1, stream=True)
    figures = sim.report() if sim is not None else json.loads(report.read_text())
    return {"mode": mode, "async_scheduling": cfg.async_scheduling, "tok_s": round(run.tokens / run.wall_s, 1),
            **figures}


async def main(args) -> list[dict]:
    torch.manual_seed(0)
    ckpt = Path(tempfile.mkdtemp()) / "sim-model"
    save_export(GPT(GPTConfig(block_size=256, vocab_size=len(ITOS), n_layer=1, n_head=1, n_embd=16)), ckpt,
                {"kind": "char", "itos": ITOS})
    cfg = EngineConfig(max_batch=args.clients, max_queue=1024, cuda_graphs=False, cpu_linear="out_in",
                       cpu_attention="torch", threads=1)
    texts = [f"client {i} says" for i in range(args.clients)]
    prompts = [[ITOS.index(ch) for ch in t] for t in texts]
    rows = []
    for mode in ("in-process engine, in-process clients", "in-process engine, HTTP",
                 "remote engine, in-process clients", "remote engine, HTTP"):
        for async_scheduling in {"off": (False,), "on": (True,), "both": (False, True)}[args.async_]:
            rows.append(await one_mode(mode, ckpt, replace(cfg, async_scheduling=async_scheduling), args, texts,
                                       prompts))
            logging.getLogger(__name__).info("%s", rows[-1])
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--per-client", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=0.9)
    p.add_argument("--async", dest="async_", choices=("off", "on", "both"), default="both")
    logging.basicConfig(level=logging.WARNING)
    for row in asyncio.run(main(p.parse_args())):
        print(json.dumps(row))
