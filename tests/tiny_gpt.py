"""A small random GPT shared by the kernel and engine set-up tests (tests/ is on sys.path
through tests/conftest.py)."""

from __future__ import annotations

import torch

from model.gpt import GPT, GPTConfig


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model
