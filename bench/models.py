"""The benchmark's models: GPT-2-shaped random weights shared by ours and transformers, and the demo model."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

from model.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)

SHAPES = {  # name -> (n_layer, n_head, n_embd), GPT-2's published sizes
    "gpt2-124M": (12, 12, 768),
    "gpt2-355M": (24, 16, 1024),
}
EOT = 50256


class IdsTokenizer:
    """Stand-in when tiktoken's GPT-2 data is unavailable: ids only, text is empty."""

    name, n_vocab, eot_id = "ids", 50257, EOT

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("no GPT-2 tokenizer data: pass --tokenizer-path")

    def decode_bytes(self, ids) -> bytes:
        return b""

    def decode(self, ids) -> str:
        return ""


def gpt2_tokenizer(tokenizer_path: str | None):
    """GPT-2 BPE, offline where possible (the repo's tests keep the data in ../shared)."""
    shared = Path(__file__).resolve().parents[1] / ".." / "shared" / "tokenizers" / "tiktoken-cache"
    if shared.is_dir():
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared.resolve()))
    try:
        from model.tokenizer import load_tokenizer_from_spec
        return load_tokenizer_from_spec({"kind": "gpt2"}, tokenizer_path)
    except Exception as err:  # the benchmark still runs on ids alone
        log.warning("GPT-2 tokenizer unavailable (%s); HTTP runs are skipped", err)
        return IdsTokenizer()


def hf_and_ours(shape: str, tokenizer, seed: int = 0):
    """A random-weight transformers GPT2LMHeadModel and the same weights as our GPT (float32, eval).

    HF's Conv1D stores weights [in, out]; nn.Linear wants [out, in], hence the transposes
    (as nanoGPT's from_pretrained). End-of-text's embedding row is zeroed: its logit is
    then 0 while random logits reach well above 0, so greedy runs never stop early on it
    and every run generates exactly the tokens asked for, in both implementations.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_head, n_embd = SHAPES[shape]
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024,
                                    vocab_size=50257)).eval()
    with torch.no_grad():
        hf.transformer.wte.weight[EOT].zero_()
    cfg = GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    bias=True, gelu_approximate="tanh")
    ours = GPT(cfg)
    sd = hf.state_dict()
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for name, p in ours.state_dict().items():
            src = sd[name]
            p.copy_(src.t() if name.endswith(transposed) else src)
    ours.eval().tokenizer = tokenizer
    return hf, ours


def in_dtype(model: GPT, dtype: torch.dtype) -> GPT:
    """A copy of `model` in another dtype (the engine lays out each copy's weights itself)."""
    other = copy.deepcopy(model).to(dtype)
    other.tokenizer = model.tokenizer
    return other


def demo_model():
    """model/demo/ loaded through our checkpoint loader, or None when absent or not loadable yet."""
    path = Path(__file__).resolve().parents[1] / "model" / "demo"
    if not (path / "config.json").exists():
        return None, "model/demo/ not present"
    try:
        from model.checkpoint import load_model_from_checkpoint
        return load_model_from_checkpoint(str(path), device="cpu"), None
    except Exception as err:
        return None, f"demo model not loadable: {type(err).__name__}: {err}"
