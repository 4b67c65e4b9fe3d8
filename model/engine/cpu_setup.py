"""CPU set-up the engine does at start-up: what runs the linear layers and the one-token
attention (model/kernels/cpu.py's kernels or torch's operators), chosen by timing them here.

- `choose_cpu_linear` picks whichever of our matrix-vector kernel and torch's F.linear in
  either weight layout decodes fastest on this machine and dtype, and lays the weights out;
- `choose_cpu_attention` gives one-token steps the fused attention op where it builds.
Why each choice exists and how it was measured: docs/engine.md.
"""

from __future__ import annotations

import logging
import mmap
import time

import torch
import torch.nn.functional as F

from model.engine.config import CPU_ATTENTION_CHOICES, CPU_LINEAR_CHOICES
from model.gpt import GPT
from model.kernels import cpu as cpukernels
from model.quant import Int8Linear

log = logging.getLogger(__name__)


KERNEL_CREDIT = 0.9  # the kernel's timed pass counts for 90%: see choose_cpu_linear


def choose_cpu_linear(model: GPT, choice: str = "auto", every_row: bool = False) -> str:
    """Decide what runs the model's linear layers on CPU, and set it up.

    - "kernel": model/kernels/cpu.py's kernel (weights [out, in]) for inputs of up to as many
      rows as it beats F.linear at here (measured: `_kernel_max_rows`), F.linear beyond.
    - "out_in": torch's F.linear on nn.Linear's own [out, in] weights.
    - "in_out": torch's F.linear on a transposed view of contiguous [in, out] storage,
      which reaches another BLAS kernel (faster in float32 on some CPUs, far slower in
      half precision).
    All three keep the same Parameter objects and values, so forward(), state_dict() and
    weight tying are unchanged. "auto" times them (`_timed_choice`). A kernel that cannot be
    built is logged and skipped by "auto", and an error when asked for by name. A model this
    function has set up before, unchanged since, keeps that set-up (for "auto", or for what it chose).

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
    if getattr(model, "quantization", None):
        return _choose_int8_linear(model, choice, every_row)
    asked = (choice, every_row)
    state, asked_before, chosen = getattr(model, "_cpu_linear_setup", (None, (None, None), None))
    if state == _linear_state(model) and asked_before[1] == every_row and (
            asked_before[0] == choice == "auto" or choice == chosen):
        # set up before, by this function, and untouched since (same storage, dtype, layout and
        # classes): timing again would lay every weight out again and copy it into a fresh arena
        log.info("CPU linear layers: kept as set up before (%s)", chosen)
        return chosen
    if choice == "auto":
        choice = _timed_choice(model)
    _install_cpu_linear(model, choice, every_row)
    model._cpu_linear_setup = (_linear_state(model), asked, choice)
    return choice


def _choose_int8_linear(model: GPT, choice: str, every_row: bool) -> str:
    """choose_cpu_linear for int8 weights (model/quant.py's modules): "kernel" (and "auto" where it
    builds) sends products of up to `_int8_kernel_max_rows` rows to linear_rows_int8, which widens
    each int8 weight in registers; "out_in" keeps the torch reference, which widens every matrix on
    every call. "in_out" lays out float weights only."""
    if choice == "in_out":
        raise ValueError(f"cpu_linear 'in_out' needs float weights; this model's are {model.quantization} "
                         "(use auto, kernel or out_in)")
    _set_int8_compute_dtype(model, _int8_compute_dtype(model))  # first: the row limit below times the reference
    if choice in ("auto", "kernel"):
        try:
            cpukernels.use_int8_kernel(model, max_rows=cpukernels.BLOCK_ROWS)
        except cpukernels.KernelUnavailable as err:
            if choice == "kernel":
                raise
            log.warning("%s; %s weights through model/quant.py's torch modules", err, model.quantization)
        else:
            max_rows = cpukernels.EVERY_ROW if every_row else _int8_kernel_max_rows(model)
            cpukernels.use_int8_kernel(model, max_rows=max_rows)
            log.info("CPU linear layers: the %s kernel (%s) for inputs of up to %s rows, the torch reference beyond",
                     model.quantization, cpukernels.isa(), "every" if every_row else max_rows)
            return "kernel"
    cpukernels.use_int8_kernel(model, on=False)
    log.info("CPU linear layers: %s weights through model/quant.py's torch modules", model.quantization)
    return "out_in"


INT8_PREFILL_ROWS = 256  # the rows _int8_compute_dtype times: a prefill chunk's, not a decode step's


def _int8_compute_dtype(model: GPT) -> torch.dtype | None:
    """float32 where the torch reference's products (prefills, and every product under
    CPU_LINEAR=out_in) run faster in float32 than in the model's half precision, timed on the
    first block's c_fc at INT8_PREFILL_ROWS rows; None (the model's own dtype) otherwise. AVX2
    CPUs have no bfloat16 dot products, and there torch's float32 GEMM wins by several times;
    with AVX512_BF16 or AMX the half-precision one may win. Either way the int8 matrix is widened
    on every call, so float32 costs no memory that stays."""
    dtype = model.transformer.wpe.weight.dtype
    if dtype == torch.float32:
        return None
    layer = model.transformer.h[0].mlp.c_fc
    x = torch.randn(INT8_PREFILL_ROWS, layer.in_features, dtype=dtype)

    def product(compute_dtype: torch.dtype | None):  # the reference's own forward, in that dtype
        def run():
            layer.compute_dtype = compute_dtype
            Int8Linear.forward(layer, x)
        return run

    own, wide = _interleaved_best_seconds(product(None), product(torch.float32), rounds=2)
    chosen = torch.float32 if wide < own else None
    log.info("CPU int8 products beyond the kernel: %s (%d rows: %s %.1f ms, float32 %.1f ms)",
             "float32" if chosen else str(dtype).removeprefix("torch."), INT8_PREFILL_ROWS,
             str(dtype).removeprefix("torch."), own * 1e3, wide * 1e3)
    return chosen


def _set_int8_compute_dtype(model: GPT, dtype: torch.dtype | None) -> None:
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.compute_dtype = dtype


def _int8_kernel_max_rows(model: GPT, limit: int = 2048) -> int:
    """_kernel_max_rows for int8 layers: rows double from one kernel block while linear_rows_int8
    beats the torch reference (which widens the whole matrix per call) on the first block's four.
    Up to 2048 rows (EngineConfig's idle_prefill_chunk): with half-precision x the kernel's tiles of
    rows beat the reference at a whole prefill's rows too (docs/quantization.md)."""
    block = model.transformer.h[0]
    layers = [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
    dtype = model.transformer.wpe.weight.dtype
    rows = cpukernels.BLOCK_ROWS
    while rows < limit:
        xs = [torch.randn(2 * rows, m.in_features, dtype=dtype) for m in layers]
        kernel, torch_ = _interleaved_best_seconds(
            lambda: [cpukernels.linear_rows_int8(x, m.weight, m.weight_scale) for x, m in zip(xs, layers)],
            lambda: [Int8Linear.forward(m, x) for x, m in zip(xs, layers)])
        if torch_ <= kernel:
            break
        rows *= 2
    return rows


def _timed_choice(model: GPT) -> str:
    """Set up each available option in turn, twice (the second round in reverse order, each
    option keeping its best, so that a burst of the host's noise cannot decide alone), time
    decode passes over all of the model's weights at batch 1 and 8 (a few matrices alone
    would sit in the CPU's cache and mislead), and return the fastest. The kernel wins near
    ties (KERNEL_CREDIT): only under it does a block's whole one-token step run as one op
    (cpukernels.DecodeStack), which the pass does not time. See docs/engine.md."""
    candidates = ["out_in", "in_out"]
    try:
        cpukernels.load()
        candidates.insert(1, "kernel")  # beside out_in: the same layout, only the class changes
    except cpukernels.KernelUnavailable as err:
        log.warning("%s; using torch's kernels", err)
    times: dict[str, float] = {}
    for candidate in candidates + candidates[::-1]:
        _set_cpu_linear(model, candidate)
        t = _decode_pass_seconds(model, give_up=2 * min(times.values(), default=float("inf")))
        times[candidate] = min(t, times.get(candidate, t))
    log.info("CPU decode pass over all weights (batch 1 + batch 8 per row), ms: %s",
             ", ".join(f"{name} {t * 1e3:.1f}" for name, t in times.items()))
    return min(times, key=lambda name: times[name] * (KERNEL_CREDIT if name == "kernel" else 1.0))


def _install_cpu_linear(model: GPT, choice: str, every_row: bool) -> None:
    """Lay the weights out for `choice`, pack them in huge pages, and set the kernel's row limit."""
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
    every weight once, and in 4 KiB pages that costs a TLB miss every few KiB (docs/engine.md).
    Values, Parameter objects and tying stay. Returns the bytes moved (0 where the OS has no
    such advice: nothing moves)."""
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
    each, so that a few seconds of the host's noise cannot fall on one side only."""
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
    8, per token: latency alone would pick torch's half-precision kernels on CPUs where they
    match ours at one row but fall far behind at a few (docs/engine.md)."""
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
    """What runs one-token (decode) attention on CPU: "kernel", model/kernels/cpu.py's fused
    op (cache writes and attention in one op per layer; faster than torch's operators in
    every case measured, see docs/engine.md), or "torch". "auto" is the kernel where it can be
    built. chunks (batch-invariant mode): the kernel takes prompt chunks as well, so that each token's attention has the bits
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
