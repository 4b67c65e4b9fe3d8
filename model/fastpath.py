"""Device fast paths the engine picks at start-up; the scheduler (model/engine.py) stays
device-agnostic.

- CUDA: `DecodeGraphs` captures `GPT.step` for one decode token (T == 1) at a few batch
  buckets with static shapes, and replays the smallest bucket that holds a batch.
- CPU: `choose_weight_layout` stores each nn.Linear weight in the layout whose batch-1
  kernel is fastest on this machine and dtype (`_fastest_layout` times both), and
  `use_fp32_decode_attention` computes small half-precision decode attention in float32.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from model.gpt import GPT, CausalSelfAttention, KVCache

log = logging.getLogger(__name__)


# --- CUDA graphs for decode --------------------------------------------------------

class DecodeGraphs:
    """CUDA graphs of the decode step, one per batch bucket: bucket -> (graph, idx, pos, logits).
    Empty (falsy) on CPU or with graphs off: then the engine runs eager decode."""

    def __init__(self):
        self.graphs: dict[int, tuple] = {}

    def __bool__(self) -> bool:
        return bool(self.graphs)

    def bucket(self, n: int) -> int:
        """Round a batch of n rows up to the next captured size (n itself without graphs)."""
        if not self.graphs:
            return n
        return min(b for b in self.graphs if b >= n)

    def replay(self, idx: list, pos: list) -> torch.Tensor | None:
        """Logits (B, 1, V) for a batch of exactly a bucket's size, or None if not captured."""
        graph = self.graphs.get(len(idx))
        if graph is None:
            return None
        g, idx_s, pos_s, logits_s = graph
        idx_s.copy_(torch.tensor(idx), non_blocking=True)
        pos_s.copy_(torch.tensor(pos), non_blocking=True)
        g.replay()
        return logits_s

    def capture(self, model: GPT, cache: KVCache, buckets, max_batch: int) -> None:
        """Capture GPT.step for T=1 at each batch bucket with static shapes (kv_len =
        block_size), warmed up on a side stream first as CUDA graphs require."""
        device, block_size = cache.k.device, model.config.block_size
        buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        pool = None
        for B in reversed(buckets):  # largest first, so smaller graphs reuse its memory pool
            idx = torch.zeros(B, 1, dtype=torch.long, device=device)
            pos = torch.zeros(B, dtype=torch.long, device=device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    model.step(idx, pos, cache, kv_len=block_size)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                logits = model.step(idx, pos, cache, kv_len=block_size)
            pool = g.pool()
            self.graphs[B] = (g, idx, pos, logits)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", buckets)


# --- CPU weight layout ---------------------------------------------------------

def choose_weight_layout(model: GPT, layout: str = "auto") -> str:
    """Store each nn.Linear weight as [out, in] (nn.Linear's layout) or as a transposed
    view of contiguous [in, out] storage. Both are the same Parameter values, so
    forward(), state_dict() and weight tying are unchanged; only which BLAS kernel
    F.linear reaches differs, and at batch 1 on CPU that decides the speed (float32
    runs faster on [in, out]; float16 collapses on it). "auto" times both on the
    model's largest matrices and returns the layout it chose."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if layout == "auto":
        layout = _fastest_layout([model.lm_head.weight, model.transformer.h[0].mlp.c_fc.weight])
    for m in linears:
        w = m.weight
        is_in_out = w.stride() == (1, w.shape[0])
        if layout == "in_out" and not is_in_out:
            w.data = w.data.t().contiguous().t()
        elif layout == "out_in" and not w.is_contiguous():
            w.data = w.data.contiguous()
    log.info("CPU weight layout: %s", layout)
    return layout


def _fastest_layout(weights: list[torch.Tensor], repeats: int = 5) -> str:
    def best_time(ws):
        x = [torch.randn(1, 1, w.shape[1], dtype=w.dtype) for w in ws]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for xi, w in zip(x, ws):
                F.linear(xi, w)
            times.append(time.perf_counter() - t0)
        return min(times)

    out_in = [w.contiguous() for w in weights]
    in_out = [w.t().contiguous().t() for w in weights]
    best_time(out_in), best_time(in_out)  # warm-up
    return "in_out" if best_time(in_out) < best_time(out_in) else "out_in"


def use_fp32_decode_attention(model: GPT, max_elements: int = 2048) -> None:
    """CPU half-precision attention for one query token is several times slower than
    float32 (bfloat16/float16 at batch 1: 0.10/0.27 ms vs 0.06/0.09 ms upcast at 80
    positions, 1.0/1.7 vs 0.3 ms at 600), while at batch 32 the upcast copies cost more
    than they save. So decode attention over at most `max_elements` (batch x positions)
    runs in float32; it is also closer to the float32 result."""
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.fp32_decode_attention_max = max_elements
