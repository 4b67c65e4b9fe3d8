"""The project's own checkpoint format: a directory that loads without pickle.

    DST/config.json        {"format": "nanogpt-k8s", "version": 1, "model": {GPTConfig fields},
                            "tokenizer": {"kind": "gpt2"} | {"kind": "char", "itos": [...]},
                            "source": {free-form provenance: original format, step, val_loss, ...}}
    DST/model.safetensors  nanoGPT parameter names; the tied embedding is stored once,
                           as `lm_head.weight` (safetensors refuses shared tensors).

An int8 export (`convert --quantize int8`, model/quant.py) is version 2, adds
"quantization": {"method": "int8", ...} to config.json, and stores each quantized matrix as
int8 `<name>.weight` with float32 `<name>.weight_scale` (one scale per output channel);
version 1 readers refuse it by its version instead of misreading int8 tensors.

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
QUANTIZED_VERSION = 2  # the same layout plus int8 matrices and their scales
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TIED_KEY = "transformer.wte.weight"  # restored from lm_head.weight on load
TIED_SCALE_KEY = "transformer.wte.weight_scale"  # int8 exports: restored from lm_head.weight_scale


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
    tied = (TIED_KEY, TIED_SCALE_KEY)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(dst / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    quantization = getattr(model, "quantization", None)
    meta = {
        "format": FORMAT_NAME,
        "version": QUANTIZED_VERSION if quantization else FORMAT_VERSION,
        "model": dataclasses.asdict(model.config),
        "tokenizer": tokenizer_spec,
        "source": source or {},
    }
    if quantization:
        meta["quantization"] = {"method": quantization, "weights": "symmetric, per output channel",
                                "scales": "float32 <name>.weight_scale"}
    (dst / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return dst


def read_export_meta(path: Path) -> tuple[GPTConfig, dict, dict]:
    """(config, tokenizer spec, source) from an export directory's config.json."""
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("version") not in (FORMAT_VERSION, QUANTIZED_VERSION):
        raise ValueError(f"{path / CONFIG_FILE}: unsupported {FORMAT_NAME} version {meta.get('version')!r}")
    return GPTConfig(**meta["model"]), meta.get("tokenizer") or {}, meta.get("source") or {}


def read_export_quantization(path: Path) -> str | None:
    """The quantization method an export's weights are stored in ("int8"), or None."""
    q = json.loads((path / CONFIG_FILE).read_text()).get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict) or not isinstance(q.get("method"), str):
        raise ValueError(f"{path / CONFIG_FILE}: quantization must be an object with a method, got {q!r}")
    return q["method"]


def read_export_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict, memory-mapped by safetensors; the tied key is filled back in."""
    from safetensors.torch import load_file

    state = load_file(str(path / WEIGHTS_FILE))
    if "lm_head.weight" in state:
        state[TIED_KEY] = state["lm_head.weight"]
    if "lm_head.weight_scale" in state:
        state[TIED_SCALE_KEY] = state["lm_head.weight_scale"]
    return state
