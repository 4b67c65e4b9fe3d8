"""Exports that run without this project: TorchScript (libtorch, C++) and ONNX (ONNX Runtime, TensorRT).

    graph.py        PortableGPT: GPT's arithmetic as plain tensor ops, the KV cache as explicit tensors
    verify.py       loads an artefact back and compares its logits with the eager model's
    torchscript.py  export_torchscript: one .pt file with forward(idx) and decode(idx, past_k, past_v)
    onnx.py         export_onnx: a directory with model.onnx (full sequence) and decode.onnx (KV cache)

Every export is written under a temporary name, loaded back and compared with the eager
model, and only renamed into place when the comparison passes (ExportError otherwise).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..gpt import GPT
from .verify import Comparison, ExportError

FORMATS = ("torchscript", "onnx")

__all__ = ["FORMATS", "Comparison", "ExportError", "export_model"]


def export_model(model: GPT, fmt: str, out: str | Path, source: dict | None = None,
                 overwrite: bool = False) -> list[Comparison]:
    """Export a loaded model (with .tokenizer) as `fmt`; returns the comparisons that passed."""
    meta = {"format": f"nanogpt-k8s-{fmt}", "model": dataclasses.asdict(model.config),
            "tokenizer": model.tokenizer.spec(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "source": source or {}}
    if fmt == "torchscript":
        from .torchscript import export_torchscript

        return export_torchscript(model, out, meta, overwrite)
    if fmt == "onnx":
        from .onnx import export_onnx

        return export_onnx(model, out, meta, overwrite)
    raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
