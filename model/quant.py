"""Weight-only int8 for a GPT: symmetric, one scale per output channel (per row of each matrix).

    q (out, in) int8 = round(W / s), s (out,) float32 = max_k |W[:, k]| / 127
    Int8Linear:     y = (x @ q^T) * s + b    q widened to x's dtype on the fly
    Int8Embedding:  wte(idx) = q[idx] * s[idx]  (the tied embedding shares q and s with lm_head)

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

QUANTIZATIONS = ("int8",)
SCALE_SUFFIX = ".weight_scale"
QMAX = 127  # symmetric: -127..127, so that -q is always representable


class QuantizeError(ValueError):
    """An unknown quantization was asked for, or a model cannot be quantized."""


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> q (out, in) int8, scale (out,) float32 with w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / QMAX  # an all-zero row keeps a tiny, harmless scale
    q = torch.round(w / scale.unsqueeze(1)).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(1)).to(dtype)


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight and float32 per-row scales (buffers: state_dict keys
    `weight`, `weight_scale`, and `bias` when there is one)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> "Int8Linear":
        return cls(*quantize_rows(m.weight), m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale  # float32 here, rounded once below
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class Int8Embedding(nn.Module):
    """nn.Embedding over int8 rows with per-row scales; returns `dtype` (the model's)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.weight[idx].float() * self.weight_scale[idx].unsqueeze(-1)).to(self.dtype)


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
