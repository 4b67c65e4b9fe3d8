"""Reference models and checkpoint writers for tests/model (imported as `model_helpers`).

The independent reference is Hugging Face's GPT2LMHeadModel with random weights (large
enough to matter); the writers turn its weights into each format people have on disk,
the way the original training code would have saved them.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
from pathlib import Path

import torch

HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # shakespeare_char's 65
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=64)


def hf_reference(activation: str = "gelu_new", bias: bool = True, vocab_size: int = 50257, seed: int = 0):
    """A random GPT2LMHeadModel (eager attention, no dropout). bias=False zeroes every bias, so it
    computes what a nanoGPT bias=False model with the same weights computes."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.utils.logging.disable_progress_bar()
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=TINY["block_size"], n_embd=TINY["n_embd"],
                     n_layer=TINY["n_layer"], n_head=TINY["n_head"], activation_function=activation,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                     bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "eager"  # not SDPA: keep the reference's arithmetic independent of ours
    torch.manual_seed(seed)
    ref = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p) if bias else torch.zeros_like(p))
            elif ".ln_" in name or "ln_f" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "c_attn" in name:
                p.normal_(0.0, 0.2)  # sharp attention, so a masking or position bug shows
            elif ".wte." in name or ".wpe." in name:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return ref


def nanogpt_state(ref, bias: bool = True) -> dict[str, torch.Tensor]:
    """The reference's weights in nanoGPT's names and layout (Conv1D transposed, embedding tied)."""
    sd = {}
    for k, v in ref.state_dict().items():
        if k == "lm_head.weight" or (not bias and k.endswith(".bias")) or k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        sd[k] = (v.t() if k.endswith(HF_CONV1D) else v).clone().contiguous()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # shared storage, as nanoGPT's torch.save writes it
    return sd


def save_nanogpt(ref, path: Path, bias: bool = True, dataset: str = "openwebtext") -> Path:
    """nanoGPT train.py's ckpt.pt, as a torch.compile'd model from an older PyTorch saves it:
    every key prefixed `_orig_mod.`, plus the stale causal-mask buffer `attn.bias`."""
    c = ref.config
    state = {f"_orig_mod.{k}": v for k, v in nanogpt_state(ref, bias).items()}
    T = c.n_positions
    for i in range(c.n_layer):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=T, bias=bias,
                      vocab_size=c.vocab_size, dropout=0.0)
    ckpt = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "model_args": model_args,
            "iter_num": 5000, "best_val_loss": torch.tensor(1.4697),
            "config": {"dataset": dataset, "batch_size": 12, "learning_rate": 6e-4, "compile": True}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def save_build_nanogpt(ref, path: Path) -> Path:
    """build-nanogpt's log/model_XXXXX.pt: its config is a dataclass pickled as `__main__.GPTConfig`."""

    @dataclasses.dataclass
    class GPTConfig:
        block_size: int = 1024
        vocab_size: int = 50257
        n_layer: int = 12
        n_head: int = 12
        n_embd: int = 768

    GPTConfig.__module__, GPTConfig.__qualname__ = "__main__", "GPTConfig"
    c = ref.config
    cfg = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                    n_head=c.n_head, n_embd=c.n_embd)
    main = sys.modules["__main__"]
    setattr(main, "GPTConfig", GPTConfig)  # pickle checks the class is reachable under that name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": nanogpt_state(ref), "config": cfg, "step": 40000, "val_loss": 3.07}, path)
    finally:
        delattr(main, "GPTConfig")  # ... and now it never is again, as in any process but the trainer's
    return path


def save_hf(ref, dst: Path, weights: str = "safetensors", prefixed: bool = True, stale: bool = False) -> Path:
    """A Hugging Face GPT-2 directory. weights="bin" writes pytorch_model.bin; prefixed=False drops
    the `transformer.` prefix (as the hub's "gpt2" does); stale adds old attn.bias/masked_bias buffers."""
    dst.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors" and prefixed and not stale:
        ref.save_pretrained(dst)
        return dst
    state = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    if not prefixed:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    if stale:
        T = ref.config.n_positions
        for k in [k for k in state if k.endswith("attn.c_attn.weight")]:
            state[k.replace("c_attn.weight", "bias")] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
            state[k.replace("c_attn.weight", "masked_bias")] = torch.tensor(-1e4)
    if weights == "bin":
        torch.save(state, dst / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(ref.config.to_dict()))
    return dst


def write_meta_pkl(path: Path, chars: str = CHARS) -> Path:
    """nanoGPT's data/shakespeare_char/prepare.py writes exactly this."""
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(meta))
    return path
