"""Sampling: per-request parameters and pure, batched tensor functions.

Every function takes per-row parameters, so one decode batch can mix greedy, top-k,
top-p and temperatures. Randomness is counter-based: the noise for token id j at
generation step s of a request with seed S is a pure integer hash of (S, s, j),
computed with tensor ops on the logits' device. So

- a seeded request gives the same tokens alone or in any batch, at any batch size,
  and `generate_text(seed=S)` matches the engine for the same seed;
- sampling needs no host sync and no generator state (it can live in a CUDA graph).

The choice is the Gumbel-max trick: argmax_j (logits_j / T + g_j) with g_j Gumbel(0, 1)
draws j with probability softmax(logits / T)_j; restricting the argmax to the top-k /
nucleus set samples from the renormalised truncated distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from model import cpukernels

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off, 1 = greedy
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # None: the engine draws one at admission
    stop: tuple[str, ...] = ()  # the text is cut before the first stop string
    stop_at_eot: bool = True  # stop at the tokenizer's end-of-text token, if it has one

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the field and its limit; return self for chaining."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if len(self.stop) > 16:
            raise ValueError(f"stop may hold at most 16 strings, got {len(self.stop)}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class BatchParams:
    """Per-row sampling parameters as tensors, plus host-side facts that pick the code path
    (known when the batch is composed, so reading them never syncs with the device)."""

    temperature: torch.Tensor  # (B,) float32; rows with 0 are greedy
    top_k: torch.Tensor  # (B,) long; 0 = off
    top_p: torch.Tensor  # (B,) float32
    seed: torch.Tensor  # (B,) long, in [0, 2**32)
    greedy: torch.Tensor  # (B,) bool
    all_greedy: bool
    any_greedy: bool
    k_max: int  # the largest top_k among sampling rows (0 if none sets one)
    full_vocab: bool  # some sampling row has top_k == 0: candidates are the whole vocabulary
    full_sort: bool  # some sampling row has top_k == 0 and top_p < 1: sort the whole vocabulary
    any_top_p: bool
    any_truncation: bool  # some sampling row has top_k or top_p: the threshold is worth computing

    @staticmethod
    def build(params: Sequence[SamplingParams | None], seeds: Sequence[int], device) -> "BatchParams":
        """Rows whose params are None (free or prefilling rows) are treated as greedy."""
        rows = [p if p is not None else SamplingParams(temperature=0.0) for p in params]
        greedy = [p.greedy for p in rows]
        sampled = [p for p, g in zip(rows, greedy) if not g]
        return BatchParams(
            temperature=torch.tensor([p.temperature for p in rows], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in rows], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in rows], dtype=torch.float32, device=device),
            seed=torch.tensor([fold_seed(s) for s in seeds], dtype=torch.long, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            k_max=max((p.top_k for p in sampled), default=0),
            full_vocab=any(p.top_k == 0 for p in sampled),
            full_sort=any(p.top_k == 0 and p.top_p < 1.0 for p in sampled),
            any_top_p=any(p.top_p < 1.0 for p in sampled),
            any_truncation=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
        )


def fold_seed(seed: int) -> int:
    """Any seed in [0, 2**63) -> 32 bits that the hash below mixes."""
    return (seed ^ (seed >> 32)) & _M32


# --- counter-based random numbers (int64 tensor ops, values kept in [0, 2**32)) ---

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 without int64 overflow: split c into 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser ("lowbias32", C. Wellons' hash-prospector): a bijection
    with good avalanche, so nearby counters give unrelated outputs."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for each (row, token id): seed, step (B,) long; token_ids (B, K) or (K,) long.

    A pure function of (seed, step, token id), so it is the same whatever the batch or
    the candidate set (full vocabulary or top-k) the token appears in.
    """
    row_key = _mix32(_mix32(seed) ^ _mix32((step + 0x9E3779B9) & _M32))  # (B,)
    u = cpukernels.noise_uniform(row_key, token_ids)  # one pass on a CPU with the kernels: the same bits
    if u is None:
        bits = _mix32(row_key.unsqueeze(1) ^ _mix32(token_ids + 0x85EBCA6B))  # (B, K)
        u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1), 24 bits
    return torch.log(u).neg_().log_().neg_()  # -log(-log(u)), in place: (B, V) passes are what sampling costs


# --- the sampler ---

def sample(logits: torch.Tensor, bp: BatchParams, step: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,) long, all < n_vocab.

    step (B,) long: how many tokens each row has generated so far (the noise counter).
    Greedy rows (temperature 0 or top_k 1) take the argmax; ties go to the lowest id.
    """
    logits = logits[:, :n_vocab].float()  # padded vocab rows are never candidates
    if bp.all_greedy:
        return logits.argmax(dim=-1)
    # Below, every pass over (B, vocabulary) costs: on a CPU at batch 32 each is a few ms, so
    # work that no row needs (the greedy argmax, a threshold nobody sets) is skipped.
    scaled = logits / bp.temperature.clamp_min(1e-6).unsqueeze(1)
    # (B, 1): the lowest logit still allowed; None: no sampling row truncates
    threshold = _truncation_threshold(scaled, bp) if bp.any_truncation else None
    if not bp.full_vocab:  # every sampling row truncates to top-k: race only the candidates
        cand, ids = scaled.topk(min(bp.k_max, n_vocab), dim=-1)
        score = cand + gumbel_noise(bp.seed, step, ids)
        score = score.masked_fill(cand < threshold, float("-inf"))
        sampled = ids.gather(1, score.argmax(dim=-1, keepdim=True)).squeeze(1)
    else:  # some row samples from the whole vocabulary
        ids = torch.arange(n_vocab, device=logits.device)
        score = scaled + gumbel_noise(bp.seed, step, ids)
        if threshold is not None:
            score = score.masked_fill(scaled < threshold, float("-inf"))
        sampled = score.argmax(dim=-1)
    return torch.where(bp.greedy, logits.argmax(dim=-1), sampled) if bp.any_greedy else sampled


def _truncation_threshold(scaled: torch.Tensor, bp: BatchParams) -> torch.Tensor:
    """Per row, the smallest scaled logit kept by top-k and then top-p (nucleus); -inf keeps all.

    Tokens tied with the threshold are kept too, so the kept set never depends on how a
    sort breaks ties, and so never on the batch.
    """
    B, V = scaled.shape
    K = V if bp.full_sort else min(max(bp.k_max, 1), V)
    vals, _ = scaled.topk(K, dim=-1)  # (B, K) descending
    rank = torch.arange(K, device=scaled.device).unsqueeze(0)  # (1, K)
    top_k = torch.where(bp.top_k > 0, bp.top_k.clamp_max(K), torch.full_like(bp.top_k, V))
    keep = rank < top_k.unsqueeze(1)  # (B, K)
    if bp.any_top_p:
        # softmax over the top-k set, then keep the smallest prefix whose mass reaches top_p
        probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        keep = keep & (mass_before < bp.top_p.unsqueeze(1))
    last = keep.sum(dim=-1, keepdim=True).clamp_min(1) - 1  # index of the last kept rank
    threshold = vals.gather(1, last)
    # rows with neither top-k nor top-p keep everything (their K may have been cut short)
    no_cut = (bp.top_k.unsqueeze(1) == 0) & (bp.top_p.unsqueeze(1) >= 1.0)
    return threshold.masked_fill(no_cut, float("-inf"))
