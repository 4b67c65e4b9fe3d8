"""CPU kernels for decoding (model/kernels/csrc/): matrix-vector products, decode attention,
every block's decode step in one op, and two sampling helpers.

- `linear_rows` (matvec.cpp): x W^T + b for up to `BLOCK_ROWS` rows of x per pass over the
  weights (float32, float16 or bfloat16 weights, float32 accumulation; AVX2, or AVX-512 where
  the CPU has it: `isa()`). Batch-1 decode is one pass over every weight per token, so it runs
  at the speed of these products.
- `decode_attention` (attention.cpp): a decode step's cache writes and attention in one op per
  layer; `decode_blocks` (block.cpp, through `DecodeStack`): every block's decode step in one op.
- `noise_uniform` and `argmax` (sampling.cpp): the sampler's random numbers and torch.argmax's
  answer, each in one pass.
Every output of the products and the attention is computed in one order whatever else is in
the call, which is what the engine's batch-invariant mode builds on. Why each exists and how
it was measured: docs/engine.md.

They are built on first use by torch's extension builder (a C++ compiler and ninja; about
20 s, then cached under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions) and
need an x86-64 CPU with AVX2. Where they cannot be built, `load()` says which of those
was missing and the engine keeps torch's kernels. Images build them once instead
(`python -m model build-kernels DIR`, a stage with a compiler) and point
NANOGPT_CPU_KERNELS_DIR at DIR: `load()` then loads that library and never compiles.
This module imports only torch (and, inside functions, model.gpt's and model.quant's classes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK_ROWS = 8  # csrc/matvec.cpp's kBlockRows: rows of x served by one pass over the weights
EVERY_ROW = sys.maxsize  # a KernelLinear row limit that sends every product to the kernel
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("matvec.cpp", "attention.cpp", "block.cpp",
                                                               "sampling.cpp", "pool.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / name for name in ("simd.h", "kernels.h", "pool.h",
                                                                 "matvec_rows.inc", "matvec_int8_rows.inc")]

# Read by csrc/pool.cpp when the library loads (docs/engine.md): how long its idle workers spin
# (microseconds, at most 1 s), and 0 to send every call to torch's pool instead.
POOL_ENV = {"NANOGPT_CPU_SPIN_US": range(0, 1_000_001), "NANOGPT_CPU_POOL": range(0, 2)}
LIBRARY = "nanogpt_cpu.so"  # what cpp_extension.load names the built library
PREBUILT_ENV = "NANOGPT_CPU_KERNELS_DIR"  # a directory `build` wrote: load it, never compile
log = logging.getLogger(__name__)

_lock = threading.Lock()
_error: str | None = None  # why the kernel is unavailable, once a load has failed
_loaded = False


class KernelUnavailable(RuntimeError):
    """The kernels cannot be built or loaded here; the message says why."""


def _missing_prerequisite() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU, this is {platform.machine()}"
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")()
    if capability not in ("AVX2", "AVX512"):
        return f"needs AVX2, torch reports CPU capability {capability}"
    try:
        import ninja  # noqa: F401  (torch's extension builder drives ninja)
    except ImportError:
        if shutil.which("ninja") is None:
            return "needs ninja (pip install ninja)"
    from torch.utils.cpp_extension import get_cxx_compiler
    if shutil.which(get_cxx_compiler()) is None:
        return f"needs a C++ compiler ({get_cxx_compiler()} not found; set CXX)"
    return None


def load() -> None:
    """Build (first time only) and load the kernels into torch.ops.nanogpt; idempotent.
    Raises KernelUnavailable naming what failed; a failure is remembered, not retried."""
    global _error, _loaded
    with _lock:
        if _loaded:
            return
        check_pool_env()
        prebuilt = os.environ.get(PREBUILT_ENV)  # read like TORCH_EXTENSIONS_DIR, by the loader
        if _error is None and prebuilt:
            _error = _load_prebuilt(Path(prebuilt))
            _loaded = _error is None
            if _loaded:
                return
        if _error is None:
            _error = _missing_prerequisite()
        if _error is None:
            try:
                _compile()
                log.info("CPU kernels: compiled from model/kernels/csrc by torch's extension builder (cached in TORCH_EXTENSIONS_DIR)")
                _loaded = True
                return
            except Exception as err:  # the compiler's own output is in err; keep its first error
                lines = [ln for ln in str(err).splitlines() if ln.strip()]
                gist = next((ln for ln in lines if "error:" in ln), lines[-1] if lines else "")
                _error = f"building model/kernels/csrc failed: {type(err).__name__}: {gist.strip()}"
        raise KernelUnavailable(f"CPU kernels unavailable: {_error}")


def check_pool_env() -> None:
    """Raises ValueError naming the variable and its range where a POOL_ENV value is not an
    integer in it (the library itself would read a bad one as 0)."""
    for name, allowed in POOL_ENV.items():
        value = os.environ.get(name)
        if value is not None and not (value.strip().isdigit() and int(value) in allowed):
            raise ValueError(f"{name} must be an integer from {allowed.start} to {allowed.stop - 1}, got {value!r}")


def _compile(build_directory: Path | None = None) -> None:
    from torch.utils import cpp_extension
    # -fopenmp: at::parallel_for is inlined from ATen's headers, and without the flag
    # it silently runs on one thread; the OpenMP runtime is torch's own (libtorch_cpu's).
    # The headers' hash is a flag because torch rebuilds when sources or flags change.
    header = hashlib.sha256(b"".join(h.read_bytes() for h in HEADERS)).hexdigest()[:16]
    # In the shared cache (TORCH_EXTENSIONS_DIR) the build's name carries the sources' digest, so two
    # checkouts with different sources keep a build each instead of rebuilding over each other.
    name = "nanogpt_cpu" if build_directory is not None else f"nanogpt_cpu_{sources_digest()[:12]}"
    where = Path(build_directory or cpp_extension._get_build_directory(name, False))
    with build_lock(where):
        cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], is_python_module=False,
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", f"-DNANOGPT_SIMD_H={header}"],
                           build_directory=None if build_directory is None else str(build_directory))


@contextlib.contextmanager
def build_lock(build_directory: Path, blocking: bool = True) -> Iterator[None]:
    """Holds an flock beside the build for the whole build. torch's own lock (a `lock` file its
    FileBaton creates and deletes) outlives a builder that was killed, and every later load then
    waits on it forever; an flock dies with its holder. Whoever holds ours is the only builder,
    so a `lock` file found under it is stale and is removed. blocking=False raises
    BlockingIOError where another process is building."""
    build_directory.mkdir(parents=True, exist_ok=True)
    with open(build_directory.with_name(build_directory.name + ".build-lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            stale = build_directory / "lock"
            if stale.exists():
                log.warning("CPU kernels: removing %s, left by a build that was interrupted", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sources_digest() -> str:
    """sha256 over every source and header of the kernels, in a fixed order."""
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _stamp() -> str:
    # A library built against one torch may crash against another: the stamp names the torch it needs.
    return f"torch {torch.__version__}\n"


def _load_prebuilt(directory: Path) -> str | None:
    """Loads DIR/nanogpt_cpu.so that `build` wrote; returns why it could not (None: loaded)."""
    where = f"{PREBUILT_ENV}={str(directory)!r}"
    try:
        stamp = (directory / "STAMP").read_text()
    except OSError as err:
        return f"{where}: no build stamp ({err.strerror}); build it with `python -m model build-kernels DIR`"
    if stamp != _stamp():
        return f"{where} was built for {stamp.strip()}, this is torch {torch.__version__}; rebuild it"
    try:
        torch.ops.load_library(str(directory / LIBRARY))
    except (OSError, RuntimeError) as err:
        return f"{where}: loading {LIBRARY} failed: {err}"
    log.info("CPU kernels: prebuilt, loaded from %s (%s, %s)", directory / LIBRARY, stamp.strip(), isa())
    return None


def build(directory: Path) -> Path:
    """Compiles the kernels into `directory` (LIBRARY and its STAMP, nothing else), for images
    whose final stage has no compiler (and loads them into this process, as torch's builder
    does: a second process must check the copy); raises KernelUnavailable naming what is missing."""
    missing = _missing_prerequisite()
    if missing:
        raise KernelUnavailable(f"CPU kernels cannot be built: {missing}")
    import tempfile
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        _compile(Path(work))
        (directory / LIBRARY).write_bytes((Path(work) / LIBRARY).read_bytes())
    (directory / "STAMP").write_text(_stamp())
    return directory / LIBRARY


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for x (..., in); weight a contiguous [out, in] CPU matrix of x's dtype.
    Call load() first."""
    return torch.ops.nanogpt.linear_rows(x, weight, bias)


def linear_rows_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (q * s)^T + b for x (..., in) float32/float16/bfloat16, weight a contiguous int8 [out, in]
    CPU matrix and scale its float32 [out, groups] scales (model/quant.py's layout); y and the bias
    in x's dtype. Widens each weight in registers, never the matrix. Call load() first."""
    return torch.ops.nanogpt.linear_rows_int8(x, weight, scale, bias)


class KernelLinear(nn.Linear):
    """nn.Linear that sends calls of at most `kernel_max_rows` rows without autograd to
    the kernel (decode batches) and everything else (big prefills, training) to
    F.linear (and so does a model moved off the CPU). Same parameters and state_dict as
    nn.Linear: `use_kernel` only changes the class of existing modules, and sets
    kernel_max_rows (measured by model/engine/cpu_setup.py)."""

    kernel_max_rows: int = BLOCK_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() <= self.kernel_max_rows * self.in_features and x.is_cpu
                and not (torch.is_grad_enabled() and self.weight.requires_grad)):
            return linear_rows(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_kernel(model: nn.Module, on: bool = True, max_rows: int = BLOCK_ROWS) -> None:
    """Turn the model's nn.Linear layers into KernelLinear layers that take inputs of up to
    `max_rows` rows (on), or back. Only the class changes: Parameters, state_dict and
    weight tying stay as they are; the kernel itself wants contiguous [out, in] weights
    (model/engine/cpu_setup.py lays them out). Raises KernelUnavailable, changing nothing, where
    the kernel cannot be loaded."""
    if on:
        load()
    for m in model.modules():
        if type(m) in (nn.Linear, KernelLinear):
            m.__class__ = KernelLinear if on else nn.Linear
            if on:
                m.kernel_max_rows = max_rows


def use_int8_kernel(model: nn.Module, on: bool = True, max_rows: int = BLOCK_ROWS) -> None:
    """use_kernel for model/quant.py's Int8Linear layers: inputs of up to `max_rows` rows go to
    linear_rows_int8, more (prefills) to Int8Linear's torch reference. Only the class changes.
    Raises KernelUnavailable, changing nothing, where the kernels cannot be loaded."""
    from model.quant import Int8Linear, KernelInt8Linear
    if on:
        load()
    for m in model.modules():
        if type(m) in (Int8Linear, KernelInt8Linear):
            m.__class__ = KernelInt8Linear if on else Int8Linear
            if on:
                m.kernel_max_rows = max_rows


def noise_uniform(row_key: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor | None:
    """model/sampling.py's uniforms for (row, token id) in one op (sampling.cpp), equal to its
    tensor ops' to the bit; None where it does not apply (off the CPU, or the kernels not
    loaded: sampling never builds them itself)."""
    if not (_loaded and row_key.is_cpu and token_ids.is_cpu):
        return None
    return torch.ops.nanogpt.noise_uniform(row_key, token_ids)


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """x.argmax(dim=-1) for (B, V) float32 logits, the same ids (the first largest, or the first
    NaN), in one op (sampling.cpp); None where it does not apply (off the CPU, another dtype or
    shape, or the kernels not loaded: sampling never builds them itself)."""
    if not (_loaded and x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0):
        return None
    return torch.ops.nanogpt.argmax_rows(x)


def isa() -> str:
    """The vector instructions linear_rows uses on this CPU: "avx512" where it has AVX-512F/BW
    (unless NANOGPT_CPU_ISA=avx2), else "avx2". Call load() first."""
    return torch.ops.nanogpt.kernel_isa()


def decode_attention(q, k, v, k_cache, v_cache, rows, pos) -> torch.Tensor | None:
    """One step's attention for B sequences of T new tokens each: writes k, v (B, nh, T, hs)
    into the contiguous caches (R, nh, S, hs) at row rows[b] (b itself when rows is None),
    positions pos[b]..pos[b]+T-1, and returns (B, T, nh, hs): query t attended over positions
    0..pos[b]+t of its row, with the same bits whatever T and the batch. None (nothing done)
    off the CPU. Call load() first."""
    if not k_cache.is_cpu:
        return None
    return torch.ops.nanogpt.decode_attention(q, k, v, k_cache, v_cache, rows, pos)


class DecodeStack:
    """Every block's one-token step for rows row0..row0+B-1 of the caches (model/gpt.py's
    Block.step_parts, block after block: the same ops, the same numbers) as one op (block.cpp's
    decode_blocks, or decode_blocks_int8 for model/quant.py's int8 layers): x (B, 1, C) ->
    (B, 1, C), for a model whose every block's attention has `decode_attention`
    (use_decode_attention installs it only then). It applies where every linear layer sends B
    rows to the kernel (KernelLinear, or KernelInt8Linear: use_kernel, use_int8_kernel, in
    either order, since only the layers' classes change). Holds the blocks' modules, Parameter
    objects and int8 scales, gathered once rather than per step (see docs/engine.md); call load()
    first."""

    def __init__(self, model: nn.Module):
        from model.quant import Int8Linear, KernelInt8Linear
        blocks = list(model.transformer.h)
        self.linears = [m for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        self.params = [p for b in blocks for m in (b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj)
                       for p in (m.weight, m.bias)]
        self.scales = [m.weight_scale if isinstance(m, Int8Linear) else None for m in self.linears]
        self.int8 = any(s is not None for s in self.scales)  # then decode_blocks_int8
        self.kernel_classes = (KernelLinear, KernelInt8Linear)  # what sends products to our kernels
        self.gelu_tanh = blocks[0].mlp.gelu.approximate == "tanh"  # one config for every block

    def applies(self, B: int, k_cache: torch.Tensor) -> bool:
        # params[0] (ln_1) and params[2] (c_attn): under autograd the op tracks nothing
        return (k_cache.is_cpu and all(type(m) in self.kernel_classes and B <= m.kernel_max_rows for m in self.linears)
                and not (torch.is_grad_enabled() and (self.params[0].requires_grad or self.params[2].requires_grad)))

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, cache, row0: int) -> torch.Tensor:
        if self.int8:
            return torch.ops.nanogpt.decode_blocks_int8(x, self.params, self.scales, cache.k, cache.v, row0, pos,
                                                        self.gelu_tanh)
        return torch.ops.nanogpt.decode_blocks(x, self.params, cache.k, cache.v, row0, pos, self.gelu_tanh)


def use_decode_attention(model: nn.Module, on: bool = True, chunks: bool = False) -> None:
    """Give (or take back from) the model's attention layers `decode_attention` for their
    one-token steps (GPT.step with T == 1), with chunks for prompt chunks as well, and a GPT a
    DecodeStack (which applies where its linear layers run on the kernels, see use_kernel and
    use_int8_kernel; install it again after replacing a block's modules, Parameter objects or
    int8 buffers: a cast of the whole model replaces an int8 layer's scales).
    Raises KernelUnavailable, changing nothing, where the kernels cannot be loaded."""
    from model.gpt import GPT, Block
    if on:
        load()
    for m in model.modules():
        if isinstance(m, Block) and m.attn.head_dim % 8 == 0:
            m.attn.decode_attention = decode_attention if on else None
            m.attn.fused_chunks = on and chunks
    for m in model.modules():
        if isinstance(m, GPT):
            fused = len(m.transformer.h) and all(b.attn.decode_attention is not None for b in m.transformer.h)
            m.decode_stack = DecodeStack(m) if on and fused else None

