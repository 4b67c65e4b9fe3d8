"""Weight-only int8 for a GPT: symmetric, per output channel in groups of GROUP inputs.

    q (out, in) int8 = round(W / s), s (out, in / GROUP) float32: the max |W| of each row's
    group of GROUP consecutive inputs / 127 (a row that GROUP does not divide: one group)
    Int8Linear:     y = x @ (q * s)^T + b     dequantized to x's dtype on the fly
    Int8Embedding:  wte(idx) = q[idx] * s[idx]  (the tied embedding shares q and s with lm_head)

Groups of 64 rather than one scale per row: on GPT-2 124M's shapes one scale per row moved a
greedy token one step earlier than float32 and bfloat16 put it; groups of 64 did not
(docs/quantization.md). The float32 scales add 1/16 to the int8 bytes.

Activations, LayerNorms, biases, the position embedding and the KV cache stay in the
serving dtype; only the scales are kept in float32 (in the model's dtype they would add a
rounding as large as half precision's own to every output). The tied token embedding /
output layer is quantized too: per output channel of lm_head is per row of wte, one scale
serves both, and it is a third of GPT-2 124M's weights. docs/quantization.md has the
measurements.

Applied from outside the model (gpt-fast style): `quantize_model` swaps a GPT's modules in
place; gpt.py calls modules and never looks inside them. On the meta device it only lays
out empty tensors of the right shapes, which is how model/checkpoint.py loads a stored
int8 export.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt import GPT
from .kernels import triton_int8

QUANTIZATIONS = ("int8",)
SCALE_SUFFIX = ".weight_scale"
QMAX = 127  # symmetric: -127..127, so that -q is always representable
GROUP = 64
DEQUANT_CHUNK_BYTES = 4 << 20  # the torch reference widens at most this much of a matrix at once


class QuantizeError(ValueError):
    """An unknown quantization was asked for, or a model cannot be quantized."""


def group_size(in_features: int) -> int:
    return GROUP if in_features % GROUP == 0 else in_features


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> q (out, in) int8, scale (out, in / group) float32, w ~= dequantize_rows(q, scale)."""
    out, n_in = w.shape
    g = group_size(n_in)
    if w.is_meta:  # a layout only: meta ops would import torch's Python decompositions (~150 MB of RSS)
        return (torch.empty(out, n_in, dtype=torch.int8, device="meta"),
                torch.empty(out, n_in // g, dtype=torch.float32, device="meta"))
    w = w.detach().float().reshape(out, n_in // g, g)
    scale = w.abs().amax(dim=2).clamp(min=1e-12) / QMAX  # an all-zero group keeps a tiny, harmless scale
    q = torch.round(w / scale.unsqueeze(2)).clamp(-QMAX, QMAX).to(torch.int8)
    return q.reshape(out, n_in), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., in) int8 with scale (..., in / group) -> (..., in) in dtype."""
    *lead, n_in = q.shape
    groups = scale.shape[-1]
    w = q.float().reshape(*lead, groups, n_in // groups) * scale.unsqueeze(-1)
    return w.reshape(*lead, n_in).to(dtype)


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight and float32 group scales (buffers: state_dict keys
    `weight`, `weight_scale`, and `bias` when there is one). On CPU a torch reference that widens
    the matrix, a slice of output rows at a time, on every call (the engine installs KernelInt8Linear
    there); on CUDA, calls of up to triton_int8.MAX_ROWS rows run model/kernels/triton_int8.py's
    kernel where triton imports."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> "Int8Linear":
        return cls(*quantize_rows(m.weight), m.bias)

    # Set by the engine's CUDA_KERNELS choice (model/engine/cuda_setup.py): the Triton kernel has run only
    # under Triton's interpreter so far, so torch's operators are the default on CUDA too.
    use_triton: bool = False
    # Set by the engine's CPU set-up (model/engine/cpu_setup.py, timed at start): the dtype CPU
    # products are computed in when it is not x's, the result rounded back to x's. The matrix is
    # widened on every call anyway, and on a CPU without native bfloat16 dot products torch's
    # float32 GEMM runs a 1024-row prefill several times faster than its bfloat16 one. None: x's dtype.
    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)  # a no-op in a model cast as a whole
        if self.use_triton and triton_int8.applies(x):  # CUDA, decode-sized: dequantized in registers, not as a whole matrix
            return triton_int8.int8_linear(x, self.weight, self.weight_scale, bias)
        dtype = self.compute_dtype if self.compute_dtype is not None and x.is_cpu else x.dtype
        if dtype != x.dtype:
            b = None if bias is None else bias.to(dtype)
            return self._widened_linear(x.to(dtype), b, dtype).to(x.dtype)
        return self._widened_linear(x, bias, x.dtype)

    def _widened_linear(self, x: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """x @ (q * s)^T + b, the matrix widened DEQUANT_CHUNK_BYTES of float32 at a time: widened
        whole, GPT-2's output layer alone would take 154 MB (124M) to 206 MB (355M) on every call."""
        rows = max(1, DEQUANT_CHUNK_BYTES // (4 * self.in_features))
        if self.out_features <= rows:
            return F.linear(x, dequantize_rows(self.weight, self.weight_scale, dtype), bias)
        return torch.cat([F.linear(x, dequantize_rows(self.weight[i:i + rows], self.weight_scale[i:i + rows], dtype),
                                   None if bias is None else bias[i:i + rows])
                          for i in range(0, self.out_features, rows)], dim=-1)


class KernelInt8Linear(Int8Linear):
    """Int8Linear whose calls of at most `kernel_max_rows` rows without autograd go to the CPU
    kernel (model/kernels/cpu.py's linear_rows_int8: int8 rows widened in registers), the rest to
    the torch reference. Installed by cpu.use_int8_kernel, which changes only the class."""

    kernel_max_rows: int = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.kernel_max_rows * self.in_features and x.is_cpu and self.weight.is_cpu:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.ops.nanogpt.linear_rows_int8(x, self.weight, self.weight_scale, bias)
        return super().forward(x)


class Int8Embedding(nn.Module):
    """nn.Embedding over int8 rows with per-row scales; returns `dtype` (the model's)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.weight[idx], self.weight_scale[idx], self.dtype)


def quantize_model(model: GPT, method: str = "int8", dtype: torch.dtype | None = None) -> GPT:
    """Swap every block's four matrices and the tied embedding/head for int8 modules, in place,
    then cast what stays floating (norms, biases, positions) to `dtype` (None: as it is).
    Quantize from the widest weights there are: from bfloat16-rounded ones, every weight
    carries two roundings. Sets model.quantization = method; a quantized model is left as it is."""
    if method not in QUANTIZATIONS:
        raise QuantizeError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    if getattr(model, "quantization", None) == method:
        return model
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr() and not model.lm_head.weight.is_meta:
        raise QuantizeError("lm_head.weight is not tied to transformer.wte.weight; GPT-2 and nanoGPT tie them")
    dtype = dtype or model.transformer.wpe.weight.dtype
    with torch.no_grad():
        for block in model.transformer.h:
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                 (block.mlp, "c_proj")):
                setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
        q, scale = quantize_rows(model.lm_head.weight)
        model.lm_head = Int8Linear(q, scale, None)
        model.transformer.wte = Int8Embedding(q, scale, dtype)
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.quantization = method
    return model


def tie_quantized(model: GPT) -> None:
    """After load_state_dict(assign=True): make wte and lm_head share one q and one scale again."""
    model.transformer.wte.weight = model.lm_head.weight
    model.transformer.wte.weight_scale = model.lm_head.weight_scale


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer, tied ones once (named_* skip repeats of one tensor object)."""
    return [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (int8 weights, their scales), tied tensors once."""
    return sum(t.numel() * t.element_size() for t in _tensors(model))


def count_weights(model: nn.Module) -> int:
    """Weights, tied once, scales not counted: GPT.num_params for a float or an int8 model."""
    return sum(t.numel() for name, t in model.named_parameters()) + sum(
        t.numel() for name, t in model.named_buffers() if not name.endswith(SCALE_SUFFIX))
