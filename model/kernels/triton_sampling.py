"""One Triton kernel for a decode step's sampling (issue 22 item 3): temperature, top-k, the
counter-based Gumbel noise and the race, per row, reading its parameters from device tensors
(static per-row buffers: nothing is read on the host, so it can be captured in a graph). Its
tokens are model/sampling.py's for the same seeds and steps: the same hash, the same float32
scaling (`div_rn`), the top-k threshold as the k-th largest scaled logit (found by bisection over
the floats' order keys, 32 passes over the row: ties with it are kept, as sample() keeps them),
CUDA's logf for the noise (libdevice, as torch's log on the GPU), and the first largest score.

Top-p (nucleus) in the same kernel, without a sort: the threshold is the largest scaled logit x
whose mass (the softmax probabilities of tokens >= x, over the row's top-k set or the whole row)
reaches top_p, and at least top-k's threshold; found by the same bisection, each of its 32 passes
summing the mass at or above a candidate in a fixed order in float32 (such a sum only grows as
terms join it, so the bisection is exact for it). Deterministic, and in exact arithmetic the set
sample() keeps (the smallest sorted prefix whose mass reaches top_p, ties with its last kept). Its
float32 sums are in another order than sample()'s cumsum, so the two kept sets differ only in a
token whose exact mass above it lies within the sums' rounding of top_p: at most V * 2**-24 of the
mass (sequential worst case; tests/kernels/test_triton_sampling.py checks 1e-5 at its small
vocabularies): a near-tie of that mass with top_p, which the two summation orders may round
either way. Everywhere else the tokens are sample()'s for the same seeds.

On the Triton CUDA path the engine captures it in each decode graph (model/engine/cuda_graphs.py,
per-row parameter buffers filled when the batch's members change) for every batch the API
accepts; the host still reads each step's tokens before launching the next (no asynchronous
scheduling yet).
"""

from __future__ import annotations

import torch

from model.kernels import triton_decode

BLOCK_V = 1024  # vocabulary entries per tile


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, step: torch.Tensor, n_vocab: int, block_v: int = BLOCK_V,
           threshold: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) (any float dtype, contiguous rows) -> token ids (B,) long < n_vocab, as
    model/sampling.sample with BatchParams of these temperature (B,) float32, top_k (B,) long,
    top_p (B,) float32, folded seed (B,) long and step (B,) long (top-p: see the module's note
    on the boundary). threshold: a (B,) float32 tensor that receives each row's smallest kept
    scaled logit (-inf: every token kept, or a greedy row), for tests."""
    B = logits.shape[0]
    if logits.stride(-1) != 1:
        raise ValueError(f"logits must be contiguous in their last dimension, strides {logits.stride()}")
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    thr = threshold if threshold is not None else torch.empty(B, dtype=torch.float32, device=logits.device)
    triton_decode._launch(triton_decode.kernels().sample, (B,), logits, temperature, top_k, top_p, seed, step, out,
                          thr, logits.stride(0), n_vocab, BLOCK_V=block_v, PRECISE_LOG=not triton_decode.interpreting())
    return out
