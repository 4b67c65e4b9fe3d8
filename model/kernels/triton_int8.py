"""Weight-only int8 products on CUDA as a Triton kernel: y = x (q * s)^T + b, with q (out, in) int8
and s (out, in / G) float32 in model/quant.py's layout, dequantized in registers a tile at a time.

Why: model/quant.py's Int8Linear widens the whole matrix to the serving dtype on every call, so
a decode step reads each weight once as int8, writes it back as bfloat16 and reads it again; this
kernel reads one byte a weight and nothing else, which is what bounds decoding at small batch.
Each tile of weights is widened (q * s in float32, rounded to x's dtype: the very weights
dequantize_rows makes) and multiplied by tl.dot with float32 accumulation; float32 inputs use
IEEE products, not TF32. Kernel launches are captured by CUDA graphs like any other.

Triton is optional (the dev extra installs it; CUDA images carry it with torch). `available()`
says whether it imports; under TRITON_INTERPRET=1 the kernel runs on CPU tensors, which is how
CPU CI tests it (tests/kernels/test_triton_int8.py). This module imports only torch and triton.
"""

from __future__ import annotations

import functools

import torch

BLOCK_K = 64  # model/quant.py's GROUP: a tile of K never spans two groups
MAX_ROWS = 64  # beyond this many rows of x, dequantizing once and one cuBLAS GEMM does better


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_matmul(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, G, groups, stride_xm, stride_ym,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            q = tl.load(q_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
            # one scale per output column of the tile: G is a multiple of BLOCK_K, or one group spans the row
            s = tl.load(s_ptr + rn * groups + k0 // G, mask=rn < N, other=0.0)
            w = (q.to(tl.float32) * s[None, :]).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            elif WIDEN:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return triton, int8_matmul


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether triton imports here (it needs a GPU, or TRITON_INTERPRET=1 for CPU tensors)."""
    try:
        _kernel()
        return True
    except ImportError:
        return False


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) float32/float16/bfloat16 times int8 q (out, in) with float32 scale (out, groups),
    plus bias (out,) in any float dtype; y (..., out) in x's dtype. Raises ValueError for a layout
    the kernel does not take (groups that are not multiples of 64 wide, unless one spans the row)."""
    triton, kernel = _kernel()
    N, K = q.shape
    groups = scale.shape[-1]
    if x.shape[-1] != K or scale.shape[0] != N or K % groups:
        raise ValueError(f"int8_linear: x (..., {x.shape[-1]}), q {tuple(q.shape)} and scale {tuple(scale.shape)} "
                         "do not match")
    G = K // groups
    if groups > 1 and G % BLOCK_K:
        raise ValueError(f"int8_linear: groups of {G} inputs; the kernel takes multiples of {BLOCK_K} or one a row")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64  # tl.dot's smallest tile is 16 rows
    block_n = 64
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    kernel[grid](x2, q.contiguous(), scale.contiguous(), bias if bias is not None else y, y, M, N, K, G, groups,
                 x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                 # Triton's interpreter (CPU tensors) gets bfloat16 products wrong (numpy has no
                 # bfloat16): there the same bfloat16 tiles are multiplied in float32
                 WIDEN=x.dtype == torch.bfloat16 and not x.is_cuda,
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K)
    return y.reshape(*x.shape[:-1], N)


def applies(x: torch.Tensor) -> bool:
    """Whether Int8Linear should call int8_linear for x: CUDA, at most MAX_ROWS rows, triton present."""
    return x.is_cuda and x.numel() <= MAX_ROWS * x.shape[-1] and available()
