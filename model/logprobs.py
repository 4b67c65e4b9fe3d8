"""Log-probabilities of tokens, for requests that ask for them (SamplingParams.logprobs and
.prompt_logprobs): pure tensor functions and the one result type.

The convention is vLLM's default (`logprobs_mode="raw_logprobs"`): the log-softmax of the
model's raw logits, before temperature, top-k or top-p. So a token's logprob is a fact about
the model and the context, the same whatever sampling settings the request carries, which
is what evaluations (lm-eval's loglikelihood) and re-scoring need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Positions per output-layer product when scoring a prompt: each costs positions x vocabulary
# floats (256 x 50257 x 4 bytes = 51 MB for GPT-2), whatever the prompt's length.
PROMPT_CHUNK = 256


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its logprob, and the `top` most likely (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n_top: int, n_vocab: int) -> list[TokenLogprob]:
    """logits (N, V) and the token that followed each row (N,) long -> one TokenLogprob per row."""
    lp = torch.log_softmax(logits[:, :n_vocab].float(), dim=-1)  # (N, n_vocab)
    chosen = lp.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
    ids = tokens.tolist()
    if n_top <= 0:
        return [TokenLogprob(t, c) for t, c in zip(ids, chosen)]
    vals, top_ids = lp.topk(min(n_top, n_vocab), dim=-1)  # (N, n_top), best first
    return [TokenLogprob(t, c, tuple(zip(i, v))) for t, c, i, v in zip(ids, chosen, top_ids.tolist(), vals.tolist())]


def prompt_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                    n_top: int, n_vocab: int, chunk: int = PROMPT_CHUNK) -> list[TokenLogprob]:
    """hidden (T, C): the final hidden states (after ln_f) at T prompt positions; targets (T,): the
    token that follows each. The output layer `head` runs `chunk` positions at a time, so memory
    stays bounded however long the prompt."""
    out: list[TokenLogprob] = []
    for i in range(0, hidden.shape[0], chunk):
        out += token_logprobs(head(hidden[i:i + chunk]), targets[i:i + chunk], n_top, n_vocab)
    return out
