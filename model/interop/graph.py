"""GPT as an export-friendly module: plain tensor ops, the KV cache passed in and returned.

`GPT.step` writes into a preallocated cache in place at per-row positions, which neither
TorchScript tracing nor ONNX can express as a pure function. PortableGPT reuses the
GPT's own submodules (so it holds no copy of the weights) and computes

    forward(idx)                 idx (B, T) -> logits (B, T, V), as GPT.forward
    decode(idx, past_k, past_v)  -> logits (B, T, V), present_k, present_v

with past_k/past_v (n_layer, B, n_head, P, head_dim) the keys/values of the P tokens seen
so far (P may be 0: then decode is the prefill) and present_* the same with the T new
tokens appended (P + T). Every row of a batch is at the same position P; a caller with
ragged rows runs them as separate batches. Attention is written out as matmul + softmax,
which every exporter and runtime has (SDPA's symbolic needs a recent opset).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..gpt import GPT


class PortableGPT(nn.Module):
    def __init__(self, model: GPT):
        super().__init__()
        self.gpt = model
        self.n_head = model.config.n_head
        self.head_dim = model.config.head_dim
        self.scale = 1.0 / math.sqrt(model.config.head_dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        logits, _, _ = self._run(idx, pos, None, None)
        return logits

    def decode(self, idx: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        T, P = idx.shape[1], past_k.shape[3]
        pos = torch.arange(T, device=idx.device) + P  # absolute positions of the new tokens
        return self._run(idx, pos, past_k, past_v)

    def _run(self, idx, pos, past_k, past_v):
        tr = self.gpt.transformer
        x = tr.wte(idx) + tr.wpe(pos)  # (B, T, C)
        keys = pos if past_k is None else torch.arange(past_k.shape[3] + idx.shape[1], device=idx.device)
        allowed = keys.unsqueeze(0) <= pos.unsqueeze(1)  # (T, P+T): causal over the cache and the new tokens
        ks, vs = [], []
        for i, block in enumerate(tr.h):
            pk = None if past_k is None else past_k[i]
            pv = None if past_v is None else past_v[i]
            y, k, v = self._attention(block.attn, block.ln_1(x), allowed, pk, pv)
            x = x + y
            x = x + block.mlp(block.ln_2(x))
            ks.append(k)
            vs.append(v)
        logits = self.gpt.lm_head(tr.ln_f(x))  # (B, T, V)
        return logits, torch.stack(ks), torch.stack(vs)

    def _attention(self, attn, x, allowed, past_k, past_v):
        B, T, C = x.shape
        q, k, v = attn.c_attn(x).split(C, dim=2)
        q, k, v = [t.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, hs)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([past_v, v], dim=2)
        att = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # (B, nh, T, P+T)
        att = att.masked_fill(~allowed, float("-inf"))
        # softmax in float32: in half precision exp() of unscaled scores loses the small weights
        att = F.softmax(att.float(), dim=-1).to(q.dtype)
        y = torch.matmul(att, v).transpose(1, 2).reshape(B, T, C)
        return attn.c_proj(y), k, v


def empty_cache(model: GPT, batch: int, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """past_k, past_v for P = 0 (nothing seen yet)."""
    c = model.config
    shape = (c.n_layer, batch, c.n_head, 0, c.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
