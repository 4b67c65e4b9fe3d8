"""Compare an exported artefact's logits with the eager model's, on sample inputs it was not traced with.

The error is measured as max |exported - eager| / max |eager| over every logit of the
sample (an elementwise relative error is meaningless for logits near zero), together with
how many positions pick the same argmax (the greedy token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..gpt import GPT

# float32: the exported graph computes the same arithmetic in another order. Half precision:
# one rounding of every activation to 8 (bfloat16) or 11 (float16) mantissa bits.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class ExportError(Exception):
    """A model could not be exported, or its artefact did not load or compute what the model computes."""


@dataclass(frozen=True)
class Comparison:
    """One artefact graph against the eager model on one sample."""
    graph: str  # "forward" or "decode"
    shape: str  # what was run, e.g. "B=3 T=11" or "B=2 P=0+9, 2 steps"
    dtype: str
    max_abs: float
    rel: float  # max_abs / max |eager logit|
    argmax_agree: float  # fraction of positions whose greedy token matches
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.tol

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"FAILED (tolerance {self.tol:.0e})"
        return (f"{self.graph:8s} {self.shape:24s} {self.dtype:9s} max|diff| {self.max_abs:.3e}  "
                f"relative {self.rel:.3e}  argmax agree {self.argmax_agree:.1%}  {verdict}")


def compare(graph: str, shape: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> Comparison:
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise ExportError(f"{graph} {shape}: logits shape {tuple(got.shape)}, the model gives {tuple(want.shape)}")
    max_abs = (got - want).abs().max().item()
    rel = max_abs / max(want.abs().max().item(), 1e-30)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    return Comparison(graph, shape, str(dtype).removeprefix("torch."), max_abs, rel, agree, TOLERANCE[dtype])


def sample_ids(model: GPT, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    length = max(1, min(length, model.config.block_size))
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


@torch.no_grad()
def check_forward(model: GPT, run: Callable[[torch.Tensor], torch.Tensor]) -> list[Comparison]:
    """`run(idx) -> logits` against GPT.forward, at shapes other than the traced ones (dynamic axes)."""
    dtype = next(model.parameters()).dtype
    out = []
    for batch, length, seed in ((1, 5, 1), (3, 11, 2)):
        idx = sample_ids(model, batch, length, seed)
        out.append(compare("forward", f"B={batch} T={idx.shape[1]}", run(idx), model(idx)[0], dtype))
    return out


@torch.no_grad()
def check_decode(model: GPT, run: Callable, empty: Callable[[int], tuple]) -> list[Comparison]:
    """`run(idx, past_k, past_v) -> (logits, present_k, present_v)`: a prefill from an empty
    cache, then one token at a time, against GPT.forward over the whole sequence."""
    dtype = next(model.parameters()).dtype
    out = []
    for batch, length, seed in ((1, 6, 3), (2, 9, 4)):
        idx = sample_ids(model, batch, length + 2, seed)
        n = idx.shape[1]
        prefill = max(1, n - 2)
        logits, pk, pv = run(idx[:, :prefill], *empty(batch))
        steps = [logits]
        for t in range(prefill, n):
            logits, pk, pv = run(idx[:, t:t + 1], pk, pv)
            steps.append(logits)
        shape = f"B={batch} P=0+{prefill}, {n - prefill} steps"
        out.append(compare("decode", shape, torch.cat(steps, dim=1), model(idx)[0], dtype))
    return out
