"""nanoGPT-compatible GPT-2 for serving: the model, safe checkpoint loading, tokenizers, generation.

    from model import load_model_from_checkpoint, generate_text
    model = load_model_from_checkpoint("out-shakespeare-char/ckpt.pt")
    print(generate_text(model, "ROMEO:", max_length=100))
"""

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
