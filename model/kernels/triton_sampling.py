"""One Triton kernel for a decode step's sampling (issue 22 item 3): temperature, top-k, the
counter-based Gumbel noise and the race, per row, reading its parameters from device tensors
(static per-row buffers: nothing is read on the host, so it can be captured in a graph). Its
tokens are model/sampling.py's for the same seeds and steps: the same hash, the same float32
scaling (`div_rn`), the top-k threshold as the k-th largest scaled logit (found by bisection over
the floats' order keys, 32 passes over the row: ties with it are kept, as sample() keeps them),
CUDA's logf for the noise (libdevice, as torch's log on the GPU), and the first largest score.

Not covered: top-p (nucleus) rows, which need a sorted cumulative sum: `supports` says so, and
the caller keeps model/sampling.sample for them. On the Triton CUDA path the engine captures it
in each decode graph (model/engine/cuda_graphs.py, per-row parameter buffers filled when the
batch's members change) and uses its tokens for batches without top-p; the host still reads
each step's tokens before launching the next (no asynchronous scheduling yet).
"""

from __future__ import annotations

import torch

from model.kernels import triton_decode

BLOCK_V = 1024  # vocabulary entries per tile


def supports(bp) -> bool:
    """Whether the kernel samples this model/sampling.BatchParams' rows (no top-p among them)."""
    return not bp.any_top_p


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
           step: torch.Tensor, n_vocab: int, block_v: int = BLOCK_V) -> torch.Tensor:
    """logits (B, V) (any float dtype, contiguous rows) -> token ids (B,) long < n_vocab, as
    model/sampling.sample with BatchParams of these temperature (B,) float32, top_k (B,) long,
    folded seed (B,) long and step (B,) long and every top_p 1."""
    B = logits.shape[0]
    if logits.stride(-1) != 1:
        raise ValueError(f"logits must be contiguous in their last dimension, strides {logits.stride()}")
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    triton_decode._launch(triton_decode.kernels().sample, (B,), logits, temperature, top_k, seed, step, out, logits.stride(0), n_vocab,
            BLOCK_V=block_v, PRECISE_LOG=not triton_decode.interpreting())
    return out
