"""GPT-2 with nanoGPT's parameter names, and a static KV cache for serving.

`GPT.forward(idx)` is nanoGPT's: full recomputation, logits for every position.
`GPT.step(idx, pos, cache)` is the serving path (gpt-fast style): it appends the
key/values of `idx` to `cache` at per-row positions `pos` and attends over the
cache, so one call serves both prefill (T > 1) and batched decode (T == 1) of
sequences of different lengths; `GPT.step_parts` runs several such batches (prompt
chunks and decodes) in one pass over the weights. This module holds no compile, graph
or device code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    dropout: float = 0.0  # kept for nanoGPT compatibility; inference ignores it
    # nanoGPT's MLP uses exact GELU ("none"); GPT-2, Hugging Face and build-nanogpt use "tanh".
    gelu_approximate: str = "none"

    def __post_init__(self) -> None:
        # Sizes first, each by name: a checkpoint's n_head 0 or n_layer 1.5 must say so, not
        # surface as a ZeroDivisionError or a TypeError from deep inside the model.
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class KVCache:
    """Key/value buffers for `n_rows` sequences of up to `block_size` tokens, every layer.

    Shape per buffer: (n_layer, n_rows, n_head, block_size, head_dim), in the model's dtype
    or a wider one (on CPU under torch's attention, where half precision is slow, the engine
    keeps float32 keys/values under half-precision weights). Allocated once;
    a row belongs to one sequence at a time, and the owner of the cache (the engine)
    decides which rows a call touches. Nothing is ever reallocated, so decode shapes
    stay static (what CUDA graphs need).
    """

    def __init__(self, config: GPTConfig, n_rows: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, n_rows, config.n_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def n_rows(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nelement() * self.k.element_size() * 2

    @staticmethod
    def bytes_for(config: GPTConfig, n_rows: int, dtype: torch.dtype) -> int:
        per_row = config.n_layer * config.n_head * config.block_size * config.head_dim
        return 2 * n_rows * per_row * torch.empty((), dtype=dtype).element_size()



def kv_cache_dtype(model: "GPT") -> torch.dtype:
    """The KV cache's dtype: the model's, except on CPU under torch's attention, where it is
    float32 (torch's half-precision attention on CPU is several times slower; a fused decode
    attention reads any cache dtype and computes in float32). Measurements: docs/engine.md."""
    p = next(model.parameters())
    fused = any(getattr(m, "decode_attention", None) is not None for m in model.modules())
    return torch.float32 if p.device.type == "cpu" and not fused else p.dtype

class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1's API)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    # A device may supply a fused one-token step (cache writes + attention in one op, with the
    # signature of model/kernels/cpu.decode_attention, returning None where it does not apply);
    # None: the torch operators below. With fused_chunks it takes prompt chunks too (whose
    # tokens then get the very bits they would get one at a time: batch-invariant mode).
    decode_attention = None
    fused_chunks = False

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def _heads(self, qkv):
        """(B, T, 3C) -> q, k, v as (B, nh, T, hs) views."""
        B, T, _ = qkv.shape
        return [t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in qkv.split(self.n_embd, dim=2)]

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self._heads(self.c_attn(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def step_parts(self, xs, contexts):
        """Serving attention for several batches (see GPT.step_parts): the projections take
        every batch's tokens in one pass over their weights, attention runs batch by batch."""
        qkvs = joint(self.c_attn, xs)
        return joint(self.c_proj, [self._attend(qkv, *ctx) for qkv, ctx in zip(qkvs, contexts)])

    def _attend(self, qkv, t, mask, k_cache, v_cache, rows=None):
        """qkv (B, T, 3C) of new tokens at absolute positions t (B, T); mask (B, 1, T, L) says
        which cached keys each query sees. k/v_cache (R, nh, S, hs): with rows None they are
        this batch's cache rows (R == B); else rows (B,) long picks the batch's rows among R.
        The cache may be wider than qkv (float32 under a half-precision model): attention
        then runs in the cache's dtype. Returns (B, T, C)."""
        B, T, C = qkv.shape[0], qkv.shape[1], self.n_embd
        q, k, v = self._heads(qkv)
        if self.decode_attention is not None and (T == 1 or self.fused_chunks):
            y = self.decode_attention(q, k, v, k_cache, v_cache, rows, t[:, 0])  # (B, T, nh, hs), or None
            if y is not None:
                return y.reshape(B, T, C)
        r = (torch.arange(B, device=qkv.device) if rows is None else rows).unsqueeze(1)  # (B, 1)
        k_cache[r, :, t] = k.transpose(1, 2).to(k_cache.dtype)  # write (B, T, nh, hs) in place
        v_cache[r, :, t] = v.transpose(1, 2).to(v_cache.dtype)
        L = mask.shape[-1]  # attend only over the first L cached positions
        keys, values = k_cache[:, :, :L], v_cache[:, :, :L]
        if rows is not None:  # gather (a copy): the batch's rows only
            keys, values = keys[rows], values[rows]
        y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask).to(qkv.dtype)
        return y.transpose(1, 2).reshape(B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def step_parts(self, xs, contexts):
        xs = [x + y for x, y in zip(xs, self.attn.step_parts([self.ln_1(x) for x in xs], contexts))]
        return [x + y for x, y in zip(xs, joint(self.mlp, [self.ln_2(x) for x in xs]))]


class GPT(nn.Module):
    # A device may supply every block's one-token step as one op (model/kernels/cpu.DecodeStack:
    # applies(B, k_cache), then a call); None: block by block, module by module.
    decode_stack = None

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            # _weight skips nn.Embedding's own init: _init_weights below does it (see there).
            wte=nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd)),
            wpe=nn.Embedding(config.block_size, config.n_embd, _weight=torch.empty(config.block_size, config.n_embd)),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (GPT-2, nanoGPT): the output projection is the token embedding.
        self.transformer.wte.weight = self.lm_head.weight
        # A model built on the meta device is about to receive a checkpoint's weights: random
        # init there is wasted work (and nn.init on meta drags in torch._dynamo, seconds of import).
        if self.lm_head.weight.device.type != "meta":
            self.apply(self._init_weights)
            # GPT-2's scaled init of residual projections (only matters for training from scratch).
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """idx (B, T) -> (logits (B, T, V), loss or None), as nanoGPT's GPT."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

    def step(self, idx, pos, cache: KVCache, row0: int = 0, kv_len: int | None = None, last_only: bool = False,
             rows: torch.Tensor | None = None):
        """Incremental forward over cache rows row0 .. row0+B-1, or over any rows `rows`.

        idx (B, T): new tokens; pos (B,) long: position of idx[:, 0] in each sequence
        (so row b's tokens land at pos[b] .. pos[b]+T-1, all < block_size).
        rows (B,) long, optional: the cache rows of idx's rows, in place of row0 (for
        batching prefills of scattered rows; attention then reads a gathered copy).
        kv_len: how many cache positions attention reads (static for CUDA graphs);
        default max(pos) + T, which needs a host sync. Returns logits (B, T, V),
        or (B, 1, V) for the last position only when last_only.
        """
        part = StepPart(idx, pos, row0=row0, kv_len=kv_len, rows=rows, logits="last" if last_only else "all")
        return self.step_parts([part], cache)[0]

    def step_parts(self, parts: list["StepPart"], cache: KVCache) -> list[torch.Tensor | None]:
        """Several step() batches (say, prompt chunks and one-token decodes, of different
        lengths) in one pass over the weights: every linear layer takes all of their tokens
        at once, attention runs batch by batch. The batches must not write the same cache
        positions. Returns each batch's logits as step() would, None where it asked for none."""
        if len(parts) == 1 and self.decode_stack is not None:
            stacked = self._stacked_step(parts[0], cache)
            if stacked is not None:
                return stacked
        contexts, xs = [], []
        for p in parts:
            B, T = p.idx.shape
            t = p.pos.unsqueeze(1) + torch.arange(T, device=p.idx.device)  # (B, T) absolute positions
            kv_len = int(p.pos.max()) + T if p.kv_len is None else p.kv_len
            keys = torch.arange(kv_len, device=p.idx.device)
            mask = (keys.view(1, 1, kv_len) <= t.unsqueeze(2)).unsqueeze(1)  # (B, 1, T, L)
            sel = slice(p.row0, p.row0 + B) if p.rows is None else slice(None)  # views, never copies
            contexts.append((t, mask, sel, p.rows))
            xs.append(self.transformer.wte(p.idx) + self.transformer.wpe(t))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            xs = block.step_parts(xs, [(t, mask, cache.k[i, sel], cache.v[i, sel], rows)
                                       for t, mask, sel, rows in contexts])
        wanted = [i for i, p in enumerate(parts) if p.logits in ("all", "last")]
        heads = joint(lambda x: self.lm_head(self.transformer.ln_f(x)),
                      [xs[i][:, -1:] if parts[i].logits == "last" else xs[i] for i in wanted])
        out: list[torch.Tensor | None] = [None] * len(parts)
        for i, logits in zip(wanted, heads):
            out[i] = logits
        for i, p in enumerate(parts):  # the caller runs the output layer itself, in pieces
            if p.logits == "hidden":
                out[i] = self.transformer.ln_f(xs[i])  # (B, T, C)
        return out

    def _stacked_step(self, p: "StepPart", cache: KVCache) -> list[torch.Tensor | None] | None:
        """step_parts([p]) for one-token steps of contiguous rows by self.decode_stack, the same
        ops in the same order (so the same numbers); None where it does not apply."""
        B, T = p.idx.shape
        if T != 1 or p.rows is not None or p.logits == "hidden" or not self.decode_stack.applies(B, cache.k):
            return None
        x = self.transformer.wte(p.idx) + self.transformer.wpe(p.pos.unsqueeze(1))
        x = self.decode_stack(x, p.pos, cache, p.row0)
        return [self.lm_head(self.transformer.ln_f(x)) if p.logits else None]


@dataclass
class StepPart:
    """One batch of GPT.step's arguments, for GPT.step_parts. logits: "all" positions,
    the "last" one, None (a prompt chunk whose logits nobody reads), or "hidden": the final
    hidden states (after ln_f) of all positions, for a caller that scores them in pieces."""
    idx: torch.Tensor
    pos: torch.Tensor
    row0: int = 0
    kv_len: int | None = None
    rows: torch.Tensor | None = None
    logits: str | None = "all"


def joint(fn, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """fn applied to several (B, T, C) inputs as one (N, C) batch, one pass over fn's
    weights, and split back into (B, T, C') outputs."""
    if len(xs) <= 1:
        return [fn(x) for x in xs]
    sizes = [x.shape[0] * x.shape[1] for x in xs]
    out = fn(torch.cat([x.reshape(n, x.shape[-1]) for x, n in zip(xs, sizes)]))
    return [o.view(x.shape[0], x.shape[1], o.shape[-1]) for x, o in zip(xs, out.split(sizes))]
