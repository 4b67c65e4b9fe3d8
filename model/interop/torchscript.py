"""TorchScript export: one file that libtorch (C++) or `torch.jit.load` runs without this project.

    module.forward(idx)                  (B, T) int64 -> logits (B, T, V)
    module.decode(idx, past_k, past_v)   -> (logits, present_k, present_v), see graph.PortableGPT
    extra file "config.json"             the model config, tokenizer spec and dtype

Traced (torch.jit.trace_module) rather than scripted: tracing records what PortableGPT
computes for one input, and batch, sequence and cache lengths stay symbolic because they
are read from the inputs' shapes. The verification runs other shapes than the traced ones.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..gpt import GPT
from .graph import PortableGPT, empty_cache
from .verify import Comparison, ExportError, check_decode, check_forward, sample_ids

CONFIG_EXTRA = "config.json"


def _trace(model: GPT) -> torch.jit.ScriptModule:
    portable = PortableGPT(model).eval()
    dtype = next(model.parameters()).dtype
    idx = sample_ids(model, 2, 7, seed=0)
    past = sample_ids(model, 2, 3, seed=5)
    _, pk, pv = portable.decode(past, *empty_cache(model, 2, dtype))  # a non-empty cache to trace with
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.trace_module(portable, {"forward": (idx,), "decode": (idx, pk, pv)}, check_trace=False)


def export_torchscript(model: GPT, out: str | Path, meta: dict, overwrite: bool = False) -> list[Comparison]:
    """Trace `model` into `out` (a file), verify the saved file, and only then move it into place."""
    out = Path(out)
    if out.is_dir() or (out.exists() and not overwrite):
        raise ExportError(f"{out} exists (use --force to overwrite a file)")
    dtype = next(model.parameters()).dtype
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        try:
            traced = _trace(model)
        except Exception as err:  # a tracer failure names the op; keep it, without a traceback
            raise ExportError(f"TorchScript tracing failed: {type(err).__name__}: {err}") from err
        torch.jit.save(traced, str(tmp), _extra_files={CONFIG_EXTRA: json.dumps(meta)})
        loaded = load(tmp)
        comps = check_forward(model, loaded.forward)
        comps += check_decode(model, loaded.decode, lambda b: empty_cache(model, b, dtype))
        failed = [c for c in comps if not c.ok]
        if failed:
            raise ExportError("the exported TorchScript does not compute the model's logits:\n  "
                              + "\n  ".join(map(str, failed)))
        os.replace(tmp, out)
        return comps
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 points at torch.export
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ExportError(f"{path}: the saved TorchScript does not load: {err}") from err


def read_meta(path: str | Path) -> dict:
    extra = {CONFIG_EXTRA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[CONFIG_EXTRA])
