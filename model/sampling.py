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

from model.kernels import cpu as cpukernels

_M32 = 0xFFFFFFFF
MAX_TOP_LOGPROBS = 100  # the engine's bound on top alternatives per token (the server's MAX_LOGPROBS is lower)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off, 1 = greedy
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # None: the engine draws one at admission
    stop: tuple[str, ...] = ()  # the text is cut before the first stop string
    stop_at_eot: bool = True  # stop at the tokenizer's end-of-text token, if it has one
    # Log-probabilities (model/logprobs.py), computed only for requests that set them: for each
    # generated token, and for each prompt token after the first, with this many top alternatives.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

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
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {value!r}")
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
    full_sort: bool  # some sampling row has top_k == 0 and top_p < 1: a nucleus over the whole vocabulary
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

NUCLEUS_CANDIDATES = 1024  # on a CPU, a top-p nucleus is first looked for among this many largest logits


def sample(logits: torch.Tensor, bp: BatchParams, step: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,) long, all < n_vocab.

    step (B,) long: how many tokens each row has generated so far (the noise counter).
    Greedy rows (temperature 0 or top_k 1) take the argmax; ties go to the lowest id.
    A sampling row races the tokens it keeps (all, or those at or above its truncation
    threshold: ties with it included) by logit / T + noise; ties go to the lowest id.
    """
    logits = logits[:, :n_vocab].float()  # padded vocab rows are never candidates
    if bp.all_greedy:
        return _argmax(logits)
    # Below, every pass over (B, vocabulary) costs: on a CPU at batch 32 each is a few ms, so
    # work that no row needs (the greedy argmax, a threshold nobody sets) is skipped, and on a
    # CPU, where reading a flag costs no device sync, the race runs over the top candidates
    # when every kept token is provably among them (the same winner as the full race).
    scaled = logits / bp.temperature.clamp_min(1e-6).unsqueeze(1)
    threshold, cand = None, None
    if bp.any_truncation:
        threshold, cand = _truncation_threshold(scaled, bp)
    if cand is not None:
        vals, ids = cand
        sampled = _race(vals, ids, vals >= threshold, gumbel_noise(bp.seed, step, ids), n_vocab)
    else:
        ids = torch.arange(n_vocab, device=logits.device)
        kept = None if threshold is None else scaled >= threshold
        sampled = _race(scaled, None, kept, gumbel_noise(bp.seed, step, ids), n_vocab)
    return torch.where(bp.greedy, _argmax(logits), sampled) if bp.any_greedy else sampled


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of (B, V) float32: the first largest (the first NaN), by the CPU op where it
    applies (torch's took 150 us a row of GPT-2's vocabulary on the Xeon, 5 ms a step at batch 32)."""
    ids = cpukernels.argmax(x)
    return x.argmax(dim=-1) if ids is None else ids


def _race(scaled, ids, kept, noise, n_vocab: int) -> torch.Tensor:
    """The token with the largest scaled logit + noise among the kept ones, ties to the lowest
    id; ids (B, K) are the candidates' token ids, or None for the whole vocabulary in order."""
    score = scaled + noise
    if kept is not None:
        score = score.masked_fill(~kept, float("-inf"))
    first = _argmax(score)  # the first largest (a NaN row still gets an id)
    if ids is None:
        return first
    first = first.unsqueeze(1)
    best = score.gather(1, first)
    lowest = torch.where(score == best, ids, n_vocab).min(dim=-1).values
    return torch.where(lowest < n_vocab, lowest, ids.gather(1, first).squeeze(1))


def _syncs_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing (no device to wait for): then
    the sampler may look at the logits to choose a shorter path to the very same tokens."""
    return device.type == "cpu"


def _truncation_threshold(scaled: torch.Tensor, bp: BatchParams):
    """Per row, the smallest scaled logit kept by top-k and then top-p (nucleus), -inf keeping
    all, as (B, 1); and, on a CPU, the (values, ids) of top candidates that hold every kept
    token of every sampling row (else None: race the whole vocabulary).

    Tokens tied with the threshold are kept too, so the kept set never depends on how a
    sort breaks ties, and so never on the batch. Probabilities for top-p are normalized over
    the row's top-k set, or over the whole vocabulary for rows without top-k; a row's numbers
    are the same whichever candidates were looked at.
    """
    B, V = scaled.shape
    on_cpu = _syncs_are_free(scaled.device)
    whole = bp.top_k == 0  # (B,) rows without top-k
    probs_all = torch.softmax(scaled, dim=-1) if bp.full_sort else None
    # one more candidate than any row keeps by top-k, to see ties past its k
    K = min(bp.k_max + 1, V)
    if bp.full_sort:
        K = V if not on_cpu else min(max(K, NUCLEUS_CANDIDATES), V)
    while True:
        vals, ids = scaled.topk(K, dim=-1)  # (B, K) descending
        rank = torch.arange(K, device=scaled.device).unsqueeze(0)  # (1, K)
        top_k = torch.where(whole, torch.full_like(bp.top_k, V), bp.top_k.clamp_max(K))
        keep = rank < top_k.unsqueeze(1)  # (B, K)
        if bp.any_top_p:
            # the smallest prefix whose mass reaches top_p: mass over the top-k set, or over
            # the whole vocabulary (a prefix of the same sums whatever K is)
            probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
            if probs_all is not None:
                probs = torch.where(whole.unsqueeze(1), probs_all.gather(1, ids), probs)
            mass_before = probs.cumsum(dim=-1) - probs
            keep = keep & (mass_before < bp.top_p.unsqueeze(1))
        last = keep.sum(dim=-1, keepdim=True).clamp_min(1) - 1  # index of the last kept rank
        threshold = vals.gather(1, last)
        # rows with neither top-k nor top-p keep everything (their K may have been cut short)
        no_cut = (whole & (bp.top_p >= 1.0)).unsqueeze(1)
        threshold = threshold.masked_fill(no_cut, float("-inf"))
        if not on_cpu:
            return threshold, None
        if K < V and bp.full_sort and bool((keep[:, -1] & whole & (bp.top_p < 1.0)).any()):
            K = V  # a nucleus may reach past the candidates: sort everything
            continue
        # every kept token is a candidate when each sampling row's threshold lies above the last
        # candidate's value (no tie with it, no row keeping the whole vocabulary)
        within = K == V or bool(((threshold > vals[:, -1:]) | bp.greedy.unsqueeze(1)).all())
        return threshold, (vals, ids) if within else None
