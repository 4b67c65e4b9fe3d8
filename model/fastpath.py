"""Device fast paths the engine picks at start-up; the scheduler (model/engine.py) stays
device-agnostic.

- CUDA: `DecodeGraphs` captures `GPT.step` for one decode token (T == 1) at a few batch
  and cache-length buckets with static shapes, and replays the smallest that holds a step;
  likewise a one-row prompt chunk at a few chunk lengths.
- CPU: `choose_cpu_linear` picks what runs nn.Linear, whichever of our matrix-vector
  kernel (model/cpukernels.py) and torch's F.linear in either weight layout decodes fastest
  on this machine and dtype; `choose_cpu_attention` gives one-token steps a fused attention
  op; `kv_cache_dtype` picks the cache's dtype to suit (float32 under torch's attention).
"""

from __future__ import annotations

import logging
import mmap
import time

import torch
import torch.nn.functional as F

from model import cpukernels
from model.engine_types import CPU_ATTENTION_CHOICES, CPU_LINEAR_CHOICES
from model.gpt import GPT, KVCache, StepPart

log = logging.getLogger(__name__)


# --- CUDA graphs for decode --------------------------------------------------------

def kv_buckets(block_size: int, n: int = 4) -> list[int]:
    """Cache lengths that decode graphs are captured for: block_size and its halves, n in all
    (1024 -> 128, 256, 512, 1024). Attention reads the whole bucket, so a batch of short
    sequences should not read a full block's worth of keys at every step."""
    return sorted({max(block_size >> i, 1) for i in range(n)})


def chunk_buckets(prefill_chunk: int, block_size: int) -> list[int]:
    """Prompt-chunk lengths that one-row prefill graphs are captured for: 16, 32, ... up to
    the engine's chunk (at most block_size)."""
    top, t, out = min(prefill_chunk, block_size), 16, []
    while t < top:
        out.append(t)
        t *= 2
    return out + [top]


class DecodeGraphs:
    """CUDA graphs of the decode step, one per (batch bucket, cache-length bucket):
    (B, L) -> (graph, logits), and of a one-row prompt chunk per (chunk bucket, cache-length
    bucket). Every decode graph reads its inputs from one device buffer, filled from pinned
    memory by one asynchronous copy per step (`load`), so preparing a step never waits for
    the device. Empty (falsy) on CPU or with graphs off: the engine runs eager."""

    def __init__(self):
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.prefills: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.batches: list[int] = []
        self.lengths: list[int] = []
        self.chunks: list[int] = []
        self.block_size = 0

    def __bool__(self) -> bool:
        return bool(self.graphs)

    def bucket(self, n: int) -> int:
        """Round a batch of n rows up to the next captured size (n itself without graphs)."""
        if not self.graphs:
            return n
        return min(b for b in self.batches if b >= n)

    def load(self, idx: list[int], pos: list[int], steps: list[int]) -> torch.Tensor:
        """Stage one decode's inputs (B = a captured bucket): token and position of each row,
        and each row's generation step, which is returned on the device for the sampler."""
        B = len(idx)
        self._staging[:, :B] = torch.tensor([idx, pos, steps], dtype=torch.long)
        self._inputs.copy_(self._staging, non_blocking=True)  # whole (contiguous): truly asynchronous
        return self._inputs[2, :B]

    def replay(self, batch: int, kv_needed: int) -> torch.Tensor:
        """Logits (B, 1, V) of the loaded batch, reading the smallest captured cache length
        that holds kv_needed positions."""
        g, logits = self.graphs[(batch, self._length(kv_needed))]
        g.replay()
        return logits

    def _length(self, kv_needed: int) -> int:
        """The smallest captured cache length that holds kv_needed positions."""
        return min(L for L in self.lengths if L >= kv_needed)

    def prefill_shape(self, n: int, pos: int) -> tuple[int, int] | None:
        """(chunk bucket, cache length) of the captured prefill for n tokens at pos, or None."""
        T = next((t for t in self.chunks if t >= n), None)
        if T is None or pos + T > self.block_size:  # padding must stay inside the block
            return None
        return T, self._length(pos + T)

    def prefill(self, row: int, pos: int, ids: list[int]) -> bool:
        """Write one row's prompt chunk into the cache by replaying a captured prefill, padded
        with token 0 to its bucket (the padding's keys and values land past the chunk, where
        the row writes again before it reads). False where none fits: run it eagerly."""
        shape = self.prefill_shape(len(ids), pos)
        if shape is None:
            return False
        T = shape[0]
        # from pageable memory: the copy has read its source when it returns, so nothing is reused too early
        self._prefill_inputs[:2 + T].copy_(torch.tensor([row, pos, *ids] + [0] * (T - len(ids))))
        self.prefills[shape].replay()
        return True

    def capture(self, model: GPT, cache: KVCache, buckets, max_batch: int, prefill_chunk: int) -> None:
        """Capture GPT.step for T=1 at each batch and cache-length bucket, and a one-row
        prompt chunk at each chunk and cache-length bucket, with static shapes, each warmed
        up on a side stream first as CUDA graphs require."""
        device, self.block_size = cache.k.device, model.config.block_size
        self.batches = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.lengths = kv_buckets(self.block_size)
        self.chunks = chunk_buckets(prefill_chunk, self.block_size)
        self._inputs = torch.zeros(3, max_batch, dtype=torch.long, device=device)
        self._staging = torch.zeros(3, max_batch, dtype=torch.long).pin_memory()
        self._prefill_inputs = torch.zeros(2 + self.chunks[-1], dtype=torch.long, device=device)
        self._pool = None
        for B in reversed(self.batches):  # largest first, so smaller graphs reuse its memory pool
            idx, pos = self._inputs[0, :B].view(B, 1), self._inputs[1, :B]
            for L in reversed(self.lengths):
                self.graphs[(B, L)] = self._capture(lambda: model.step(idx, pos, cache, kv_len=L))
        row, pos = self._prefill_inputs[0:1], self._prefill_inputs[1:2]
        for T in self.chunks:
            idx = self._prefill_inputs[2:2 + T].view(1, T)
            for L in (L for L in self.lengths if L >= T):
                part = StepPart(idx, pos, kv_len=L, rows=row, logits=None)
                self.prefills[(T, L)] = self._capture(lambda: model.step_parts([part], cache))[0]
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s x cache lengths %s, and one-row prompt "
                 "chunks of %s tokens", self.batches, self.lengths, self.chunks)

    def _capture(self, fn) -> tuple:
        """(graph, fn's output) with fn captured into the graphs' shared memory pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            out = fn()
        self._pool = g.pool()
        return g, out


# --- CPU matrix products ------------------------------------------

KERNEL_CREDIT = 0.9  # the kernel's timed pass counts for 90%: see choose_cpu_linear


def choose_cpu_linear(model: GPT, choice: str = "auto", every_row: bool = False) -> str:
    """Decide what runs the model's linear layers on CPU, and set it up.

    - "kernel": model/cpukernels.py's kernel (weights [out, in]) for inputs of up to as many
      rows as it beats F.linear at here (measured: `_kernel_max_rows`), F.linear beyond.
    - "out_in": torch's F.linear on nn.Linear's own [out, in] weights.
    - "in_out": torch's F.linear on a transposed view of contiguous [in, out] storage,
      which reaches another BLAS kernel (faster in float32 on some CPUs, far slower in
      half precision).
    All three keep the same Parameter objects and values, so forward(), state_dict() and
    weight tying are unchanged. "auto" sets up each available option in turn, twice, and times
    decode passes over all of the model's weights at batch 1 and 8 (a few matrices alone
    would sit in the CPU's cache and mislead), then keeps the fastest, the kernel winning
    near ties (KERNEL_CREDIT). A kernel that cannot be built is
    logged and skipped by "auto", and an error when asked for by name. A model this function
    has set up before, unchanged since, keeps that set-up (for "auto", or for what it chose).

    every_row (batch-invariant mode): the kernel takes every product, whatever its rows (it
    sums each output in one order whatever the batch; torch's GEMMs do not promise that).
    It must be buildable, and choice "auto" or "kernel"."""
    if choice not in CPU_LINEAR_CHOICES:
        raise ValueError(f"cpu_linear must be one of {', '.join(CPU_LINEAR_CHOICES)}, got {choice!r}")
    if every_row:
        if choice not in ("auto", "kernel"):
            raise ValueError(f"batch-invariant mode runs every linear layer on the kernel; cpu_linear {choice!r} "
                             "contradicts it (use auto or kernel)")
        choice = "kernel"
    asked = (choice, every_row)
    state, asked_before, chosen = getattr(model, "_cpu_linear_setup", (None, (None, None), None))
    if state == _linear_state(model) and asked_before[1] == every_row and (
            asked_before[0] == choice == "auto" or choice == chosen):
        # set up before, by this function, and untouched since (same storage, dtype, layout and
        # classes): timing again would lay every weight out three more times and copy it into a
        # fresh arena, a second or more per engine started on a model that is already served
        log.info("CPU linear layers: kept as set up before (%s)", chosen)
        return chosen
    if choice == "auto":
        candidates = ["out_in", "in_out"]
        try:
            cpukernels.load()
            candidates.insert(1, "kernel")  # beside out_in: the same layout, only the class changes
        except cpukernels.KernelUnavailable as err:
            log.warning("%s; using torch's kernels", err)
        # Two rounds, the second in reverse order (no extra re-layout at the turn), each
        # option keeping its best: a burst of the host's noise during one option's timing
        # once made the kernel look 3x slower than it is and put bfloat16 on F.linear.
        times: dict[str, float] = {}
        for candidate in candidates + candidates[::-1]:
            _set_cpu_linear(model, candidate)
            t = _decode_pass_seconds(model, give_up=2 * min(times.values(), default=float("inf")))
            times[candidate] = min(t, times.get(candidate, t))
        log.info("CPU decode pass over all weights (batch 1 + batch 8 per row), ms: %s",
                 ", ".join(f"{name} {t * 1e3:.1f}" for name, t in times.items()))
        # The pass times the products alone, but only under the kernel does a block's whole
        # one-token step run as one op (cpukernels.DecodeStack): 1-2 ms of a 12-25 ms batch-1
        # step here. So torch's options must beat the kernel by more than that: one run here timed
        # F.linear 3% ahead, and batch 1 in float32 then reached 1.05x transformers (1.44-1.54x
        # under the kernel).
        choice = min(times, key=lambda name: times[name] * (KERNEL_CREDIT if name == "kernel" else 1.0))
    _set_cpu_linear(model, choice)
    packed = pack_in_huge_pages(model)
    if packed:
        log.info("CPU linear weights: %.0f MiB in one arena of 2 MiB pages", packed / 2**20)
    if choice == "kernel" and every_row:
        cpukernels.use_kernel(model, max_rows=cpukernels.EVERY_ROW)
        log.info("CPU linear layers: the kernel (%s) for every product (batch-invariant mode)", cpukernels.isa())
    elif choice == "kernel":
        max_rows = _kernel_max_rows(model)
        cpukernels.use_kernel(model, max_rows=max_rows)
        log.info("CPU linear layers: the kernel (%s) for inputs of up to %d rows, torch's F.linear beyond",
                 cpukernels.isa(), max_rows)
    else:
        log.info("CPU linear layers: torch's F.linear, weights %s", choice)
    model._cpu_linear_setup = (_linear_state(model), asked, choice)
    return choice


def _linear_state(model: GPT) -> tuple:
    """What choose_cpu_linear set up, as it stands: each linear layer's class, row limit and
    weight (storage address, dtype, layout). A later change (model.to, new weights, a
    layer switched by hand) makes it differ."""
    return tuple((type(m), getattr(m, "kernel_max_rows", None), m.weight.data_ptr(), m.weight.dtype,
                  m.weight.stride(), m.weight.device) for m in model.modules() if isinstance(m, torch.nn.Linear))


def _set_cpu_linear(model: GPT, choice: str) -> None:
    cpukernels.use_kernel(model, choice == "kernel")  # first: raises before anything changes
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                if choice == "in_out" and w.stride() != (1, w.shape[0]):
                    w.data = w.data.t().contiguous().t()
                elif choice != "in_out" and not w.is_contiguous():
                    w.data = w.data.contiguous()


def pack_in_huge_pages(model: GPT) -> int:
    """Move every linear layer's weight storage (in its current layout) into one anonymous
    mapping that asks the OS for 2 MiB pages (madvise MADV_HUGEPAGE: honoured where
    transparent huge pages are "always" or "madvise", the usual settings). A decode step streams
    every weight once; in 4 KiB pages that is some 60,000 TLB misses per token for GPT-2
    124M in half precision: 5-7% of a step on a 2-core AMD EPYC, about 3% on a Xeon. Values, Parameter objects and
    tying stay. Returns the bytes moved (0 where the OS has no such advice: nothing moves)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    weights = list({id(m.weight): m.weight for m in model.modules()
                    if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu"}.values())
    # each matrix's storage: the weight itself, or for the [in, out] layout its transpose
    bases = [w.data if w.is_contiguous() else w.data.t() for w in weights]
    if not weights or not all(b.is_contiguous() for b in bases):
        return 0
    align = 4096  # each matrix starts on its own page
    offsets, total = [], 0
    for b in bases:
        offsets.append(total)
        total += -(-b.nbytes // align) * align
    arena = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)  # before the first write, which is when pages are chosen
    memory = torch.frombuffer(arena, dtype=torch.uint8)  # the tensors keep the mapping alive
    with torch.no_grad():
        for w, b, at in zip(weights, bases, offsets):
            new = memory[at:at + b.nbytes].view(b.dtype).view(b.shape).copy_(b)
            w.data = new if w.is_contiguous() else new.t()
    return total


def _kernel_max_rows(model: GPT, limit: int = 512) -> int:
    """Up to how many rows of input the kernel beats F.linear: rows double from one block
    of the kernel's while it wins, timed on the first transformer block's matrices (with
    several rows the products are bound by arithmetic more than by memory, so a block
    stands for the whole model here)."""
    block = model.transformer.h[0]
    weights = [m.weight for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    rows = cpukernels.BLOCK_ROWS
    while rows < limit:
        xs = [torch.randn(2 * rows, w.shape[1], dtype=w.dtype) for w in weights]
        kernel, torch_ = _interleaved_best_seconds(lambda: [cpukernels.linear_rows(x, w) for x, w in zip(xs, weights)],
                                                   lambda: [F.linear(x, w) for x, w in zip(xs, weights)])
        if torch_ <= kernel:
            break
        rows *= 2
    return rows


def _interleaved_best_seconds(a, b, rounds: int = 3) -> tuple[float, float]:
    """The best of `rounds` timed calls of a and of b, taken in turns after a warm-up call of
    each: timed one after the other, a few seconds of the host's noise fell on one side only
    and once put batch-32 decode steps on torch's GEMM (122 ms a step against 104 on the kernel)."""
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for i in range(rounds + 1):
            for j, fn in enumerate((a, b)):
                t0 = time.perf_counter()
                fn()
                if i:
                    best[j] = min(best[j], time.perf_counter() - t0)
    return best[0], best[1]


def _decode_pass_seconds(model: GPT, give_up: float = float("inf")) -> float:
    """A decode pass through every linear layer's own forward at batch 1 plus one at batch
    8, per token: latency alone would pick torch's half-precision kernels on some CPUs
    where they match ours at one row, while their matrix products are 3-4x slower at 8."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = 0.0
    for rows in (1, 8):
        xs = [torch.randn(rows, 1, m.in_features, dtype=m.weight.dtype) for m in linears]
        total += _best_seconds(lambda: [m(x) for x, m in zip(xs, linears)], give_up=give_up * rows) / rows
        if total > give_up:
            break
    return total


def _best_seconds(fn, repeats: int = 3, give_up: float = float("inf")) -> float:
    """Best of `repeats` timed calls after a warm-up call; just the warm-up's time when
    that alone took over `give_up` seconds (a clear loser)."""
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            if i == 0 and elapsed > give_up:
                return elapsed
            best = best if i == 0 else min(best, elapsed)
    return best


def choose_cpu_attention(model: GPT, choice: str = "auto", chunks: bool = False) -> str:
    """What runs one-token (decode) attention on CPU: "kernel", model/cpukernels.py's fused
    op (cache writes and attention in one op per layer; faster than torch's operators in
    every case measured here, 6x at batch 1 over 65 positions, 1.4-6x at batch 32 over
    1000), or "torch". "auto" is the kernel where it can be built. chunks (batch-invariant
    mode): the kernel takes prompt chunks as well, so that each token's attention has the bits
    of a one-token step; it must be buildable, and choice "auto" or "kernel"."""
    if choice not in CPU_ATTENTION_CHOICES:
        raise ValueError(f"cpu_attention must be one of {', '.join(CPU_ATTENTION_CHOICES)}, got {choice!r}")
    if chunks and choice == "torch":
        raise ValueError("batch-invariant mode runs attention on the kernel; cpu_attention 'torch' contradicts it "
                         "(use auto or kernel)")
    if chunks and model.config.head_dim % 8:
        raise ValueError(f"batch-invariant mode needs a head_dim that is a multiple of 8 (the attention kernel's), "
                         f"this model's is {model.config.head_dim}")
    if choice != "torch":
        try:
            cpukernels.use_decode_attention(model, chunks=chunks)
            return "kernel"
        except cpukernels.KernelUnavailable as err:
            if choice == "kernel" or chunks:
                raise
            log.warning("%s; decode attention uses torch's operators", err)
    cpukernels.use_decode_attention(model, on=False)
    return "torch"


def kv_cache_dtype(model: GPT) -> torch.dtype:
    """The KV cache's dtype: the model's, except on CPU under torch's attention, where it is
    float32: torch's half-precision attention on CPU is 2.5-6x slower than float32 (12
    heads of 64: batch 1 over 128 positions 166/355 us bfloat16/float16 vs 66 us with
    float32 keys and values; batch 32 over 1000, 42/66 ms vs 16 ms). The fused decode
    attention computes in float32 from any cache dtype, and a half-precision cache halves
    what it reads (batch 32 over 1000: 6.4 ms over bfloat16, 11.4 over float32)."""
    p = next(model.parameters())
    fused = any(getattr(m, "decode_attention", None) is not None for m in model.modules())
    return torch.float32 if p.device.type == "cpu" and not fused else p.dtype
