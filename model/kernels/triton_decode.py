"""Triton kernels for the CUDA decode step (issue 22): a block's one-token step in five launches.

- `attention`: writes each row's new key and value into the KV cache at the row's own
  position and attends over that row's own length, positions 0..pos[b] (no mask, no padding
  read), so one captured graph per batch size serves every cache length.
- `linear`: y = x W^T + b for a few rows of x (a decode batch), optionally with the layer
  norm of x fused in front (`ln=`), GELU fused behind (`gelu=`) or a residual added
  (`residual=`). A block is then: LN1+c_attn, attention, c_proj+residual, LN2+c_fc+GELU,
  c_proj+residual.
- `TritonDecodeStack`: GPT.decode_stack (model/gpt.py's hook) running every block that way;
  `use_triton_decode` installs it and the attention hook from outside the model.

Numbers follow torch's operators step by step (the norm's output, each product and the GELU
are rounded to the model's dtype where torch's are), so the path differs from torch's only by
summation order. Kernels are compiled on first use, also under Triton's interpreter
(TRITON_INTERPRET=1, CPU tensors), which is how CI tests them. triton reads that flag when it
is imported (its own tl.sum and friends are jitted then) and when a kernel is defined, so it
must be set before anything imports triton (tests/conftest.py does), and this module imports
triton and the kernels' source (triton_src.py) only on first use. Under it, bfloat16
dot products are widened to float32 first (its bfloat16 dot returns garbage); products of
bfloat16 values are exact in float32, so only the summation order differs from the GPU's.
Every launch goes through `_launch`, which the op-count test replaces with a counting stub.
"""

from __future__ import annotations

import functools
import math
import types

import torch
import torch.nn as nn

GELU_MODES = {"none": 1, "tanh": 2}  # nn.GELU(approximate=...) -> the kernel's GELU constant
BLOCK_M = 16  # rows of x per program: tl.dot's smallest tile
BLOCK_N = 32  # outputs per program: enough programs to cover a GPU's SMs at GPT-2's widths
BLOCK_K = 64
BLOCK_KEYS = 64  # cache positions per attention iteration


class TritonUnavailable(RuntimeError):
    """Triton cannot be imported here; the message says why."""


def available() -> str | None:
    """None where triton imports, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising anything on import
        return f"triton is not importable: {type(err).__name__}: {err}"
    return None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read by triton itself)."""
    from triton import knobs
    return bool(knobs.runtime.interpret)


@functools.lru_cache(maxsize=1)
def kernels() -> types.SimpleNamespace:
    """The jitted kernels (compiled, or interpreted under TRITON_INTERPRET=1), imported once."""
    import triton

    from model.kernels import triton_src
    return types.SimpleNamespace(attention=triton_src.attention_kernel, linear=triton_src.linear_kernel,
                                 sample=triton_src.sample_kernel, cdiv=triton.cdiv,
                                 next_power_of_2=triton.next_power_of_2)


def _launch(kernel, grid, *args, **meta) -> None:
    """Every kernel launch of this module (the op-count test counts them here)."""
    kernel[grid](*args, **meta)


def attention(q, k, v, k_cache, v_cache, pos, rows=None) -> torch.Tensor:
    """One decode token per row: q, k, v (B, nh, hs) (any strides, the last dimension
    contiguous); caches (R, nh, S, hs) with contiguous positions; pos (B,) long, each < S;
    rows (B,) long or None (row b). Writes k, v at cache[rows[b], :, pos[b]] (cast to the
    cache's dtype, as torch's index_put_ does) and returns (B, nh, hs) in q's dtype: each
    row's attention over its positions 0..pos[b]."""
    B, nh, hs = q.shape
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, strides {t.stride()}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must share strides, got {k_cache.stride()} and {v_cache.stride()}")
    kern = kernels()
    out = torch.empty(B, nh, hs, dtype=q.dtype, device=q.device)
    _launch(kern.attention, (B, nh), q, k, v, k_cache, v_cache, pos if rows is None else rows, pos, out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
            1.0 / math.sqrt(hs), HAS_ROWS=rows is not None, HS=hs, BLOCK_D=kern.next_power_of_2(hs),
            BLOCK_N=BLOCK_KEYS)
    return out


def linear(x, weight, bias=None, *, ln: tuple | None = None, eps: float = 1e-5, gelu: str | None = None,
           residual=None) -> torch.Tensor:
    """x (M, K) -> (M, N): layer_norm(x) (with ln = (weight, bias or None)) times weight (N, K)^T,
    plus bias, then GELU ("none": exact, "tanh") or plus residual (M, N). Inputs contiguous in
    their last dimension; the output has x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"x and weight must be contiguous in their last dimension, strides {x.stride()}, "
                         f"{weight.stride()}")
    kern = kernels()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ln_w, ln_b = ln if ln is not None else (None, None)
    r = residual if residual is not None else out
    _launch(kern.linear, (kern.cdiv(N, BLOCK_N), kern.cdiv(M, BLOCK_M)), x, weight,
            bias if bias is not None else weight, r, ln_w if ln_w is not None else weight,
            ln_b if ln_b is not None else weight, out, M, N, K, x.stride(0), weight.stride(0), r.stride(0),
            out.stride(0), eps, HAS_BIAS=bias is not None, LN=ln is not None, LN_BIAS=ln_b is not None,
            GELU=GELU_MODES[gelu] if gelu else 0, RESIDUAL=residual is not None,
            WIDEN=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting()),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


class DecodeAttention:
    """CausalSelfAttention.decode_attention (model/gpt.py's hook) by `attention`, for one-token
    steps on the given device types; None (torch's operators) elsewhere."""

    def __init__(self, devices: tuple[str, ...] = ("cuda",)):
        self.devices = devices

    def __call__(self, q, k, v, k_cache, v_cache, rows, pos) -> torch.Tensor | None:
        if q.shape[2] != 1 or k_cache.device.type not in self.devices:
            return None
        y = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache, v_cache, pos, rows)  # (B, nh, hs)
        return y.unsqueeze(1)  # (B, 1, nh, hs)


class TritonDecodeStack:
    """GPT.decode_stack (model/gpt.py's hook): every block's one-token step for rows
    row0..row0+B-1 as five launches a block (LN1+c_attn, attention, c_proj+residual,
    LN2+c_fc+GELU, c_proj+residual), on the given device types. It reads no kv_len: each
    row attends over its own length. Holds the blocks' Parameter objects, gathered once."""

    def __init__(self, model: nn.Module, devices: tuple[str, ...] = ("cuda",)):
        self.devices = devices
        self.n_head = model.config.n_head
        self.gelu = model.transformer.h[0].mlp.gelu.approximate  # one config for every block
        self.blocks = [(b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj)
                       for b in model.transformer.h]
        self.any_param = model.transformer.h[0].attn.c_attn.weight

    def applies(self, B: int, k_cache: torch.Tensor) -> bool:
        return (k_cache.device.type in self.devices
                and not (torch.is_grad_enabled() and self.any_param.requires_grad))

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, cache, row0: int) -> torch.Tensor:
        B, _, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        x = x.view(B, C)
        for i, (ln_1, c_attn, a_proj, ln_2, c_fc, m_proj) in enumerate(self.blocks):
            qkv = linear(x, c_attn.weight, c_attn.bias, ln=(ln_1.weight, ln_1.bias))  # (B, 3C)
            q, k, v = (qkv[:, j * C:(j + 1) * C].view(B, nh, hs) for j in range(3))
            y = attention(q, k, v, cache.k[i, row0:row0 + B], cache.v[i, row0:row0 + B], pos)
            x = linear(y.view(B, C), a_proj.weight, a_proj.bias, residual=x)
            h = linear(x, c_fc.weight, c_fc.bias, ln=(ln_2.weight, ln_2.bias), gelu=self.gelu)  # (B, 4C)
            x = linear(h, m_proj.weight, m_proj.bias, residual=x)
        return x.view(B, 1, C)


def use_triton_decode(model: nn.Module, on: bool = True, devices: tuple[str, ...] = ("cuda",)) -> None:
    """Give (or take back from) a GPT the Triton decode path: every attention layer's
    decode_attention and the model's decode_stack, used where the cache is on one of
    `devices` (CPU tensors only under Triton's interpreter, for tests). Raises
    TritonUnavailable, changing nothing, where triton cannot be imported."""
    if on:
        why = available()
        if why:
            raise TritonUnavailable(why)
        # The fused products read float weights; int8 layers (model/quant.py) keep their own Triton
        # matrix product on torch's path, so such a model is refused here rather than misread.
        if any(getattr(m, "weight", None) is not None and m.weight.dtype == torch.int8 for m in model.modules()):
            raise TritonUnavailable("the fused decode kernels read float weights, not int8 (QUANTIZE=int8)")
    hook = DecodeAttention(devices) if on else None
    for block in model.transformer.h:
        block.attn.decode_attention = hook
        block.attn.fused_chunks = False
    model.decode_stack = TritonDecodeStack(model, devices) if on else None
