"""A tiny random GPT with a character tokenizer, for engine, sampling and generate tests."""

from __future__ import annotations

import string

import pytest
import torch

from model.gpt import GPT, GPTConfig
from model.tokenizer import CharTokenizer

ITOS = list(string.ascii_lowercase + " .,\n")  # 30 characters; the model pads its vocab to 40


def tiny_model(block_size: int = 32, vocab_size: int = 40, seed: int = 0, eot_id: int | None = None) -> GPT:
    """Random weights large enough that logits are decisive (no near-ties between tokens)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.eval()
    tokenizer = CharTokenizer(ITOS)
    if eot_id is not None:
        tokenizer.eot_id = eot_id  # instance attribute: this tokenizer "ends" at that character
    model.tokenizer = tokenizer
    return model


def full_recompute_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    """Reference: nanoGPT-style generation, recomputing the whole context each token."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            token = int(logits[0, -1, : model.tokenizer.n_vocab].argmax())
            out.append(token)
            ids.append(token)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two busy cores;
    restore torch's setting afterwards so other tests are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
