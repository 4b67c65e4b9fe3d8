"""nanoGPT-compatible GPT-2 for serving: the model, safe checkpoint loading, tokenizers, generation.

    from model import load_model_from_checkpoint, generate_text
    model = load_model_from_checkpoint("out-shakespeare-char/ckpt.pt")
    print(generate_text(model, "ROMEO:", max_length=100))
"""

import os

# Before torch loads its OpenMP runtime (libgomp reads this once, then): its idle workers spin
# 10000 times (about 0.1 ms) rather than about 3 ms before they sleep, so that they do not spin
# on the CPUs that the CPU kernels' own workers need for the next decode step's products
# (docs/engine.md, "Their own worker threads"). No effect where torch was imported first.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .checkpoint import CheckpointError, CheckpointInfo, load_model_from_checkpoint
from .generate import generate_text
from .gpt import GPT, GPTConfig, KVCache
from .tokenizer import Tokenizer, TokenizerError

__all__ = [
    "GPT", "GPTConfig", "KVCache",
    "load_model_from_checkpoint", "CheckpointError", "CheckpointInfo",
    "Tokenizer", "TokenizerError",
    "generate_text",
]
