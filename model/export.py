"""The project's own checkpoint format: a directory that loads without pickle.

    DST/config.json        {"format": "nanogpt-k8s", "version": 1, "model": {GPTConfig fields},
                            "tokenizer": {"kind": "gpt2"} | {"kind": "char", "itos": [...]},
                            "source": {free-form provenance: original format, step, val_loss, ...}}
    DST/model.safetensors  nanoGPT parameter names; the tied embedding is stored once,
                           as `lm_head.weight` (safetensors refuses shared tensors).

`python -m model convert SRC DST` writes it from any supported format; the server and
the operator prefer it because loading it runs no code and can be memory-mapped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .gpt import GPT, GPTConfig

FORMAT_NAME = "nanogpt-k8s"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TIED_KEY = "transformer.wte.weight"  # restored from lm_head.weight on load


def is_export_dir(path: Path) -> bool:
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def save_export(model: GPT, dst: str | Path, tokenizer_spec: dict, source: dict | None = None) -> Path:
    """Write `model` (weights as they are, in their dtype) and its tokenizer spec to `dst`."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}
    save_file(state, str(dst / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.config),
        "tokenizer": tokenizer_spec,
        "source": source or {},
    }
    (dst / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return dst


def read_export_meta(path: Path) -> tuple[GPTConfig, dict, dict]:
    """(config, tokenizer spec, source) from an export directory's config.json."""
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: unsupported {FORMAT_NAME} version {meta.get('version')!r}")
    return GPTConfig(**meta["model"]), meta.get("tokenizer") or {}, meta.get("source") or {}


def read_export_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict, memory-mapped by safetensors; the tied key is filled back in."""
    from safetensors.torch import load_file

    state = load_file(str(path / WEIGHTS_FILE))
    if "lm_head.weight" in state:
        state[TIED_KEY] = state["lm_head.weight"]
    return state
