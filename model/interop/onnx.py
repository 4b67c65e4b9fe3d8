"""ONNX export: a directory that ONNX Runtime (or TensorRT) runs without torch or this project.

    OUT/model.onnx   idx (batch, seq) int64 -> logits (batch, seq, vocab)
    OUT/decode.onnx  idx (batch, seq), past_k, past_v (n_layer, batch, n_head, past, head_dim)
                     -> logits, present_k, present_v (n_layer, batch, n_head, past + seq, head_dim)
    OUT/config.json  the model config, tokenizer spec, dtype, input/output names and the
                     verification that passed (docs/export.md; scripts/onnx_generate.py reads it)

Exported with torch.onnx's TorchScript-based exporter (`dynamo=False`), which every torch
from 2.1 to 2.13 has and which needs no onnxscript; opset 17. Models over protobuf's 2 GiB
get their weights as external data files beside the graphs, which is why OUT is a directory.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..gpt import GPT
from .graph import PortableGPT, empty_cache
from .verify import Comparison, ExportError, check_decode, check_forward, sample_ids

OPSET = 17
FORWARD_FILE, DECODE_FILE, CONFIG_FILE = "model.onnx", "decode.onnx", "config.json"
DECODE_INPUTS = ["idx", "past_k", "past_v"]
DECODE_OUTPUTS = ["logits", "present_k", "present_v"]


class _Decode(nn.Module):
    """PortableGPT.decode as a module's forward, which is what torch.onnx exports."""

    def __init__(self, portable: PortableGPT):
        super().__init__()
        self.portable = portable

    def forward(self, idx, past_k, past_v):
        return self.portable.decode(idx, past_k, past_v)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list, outputs: list, axes: dict) -> None:
    kwargs = dict(input_names=inputs, output_names=outputs, dynamic_axes=axes, opset_version=OPSET,
                  do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5; the default became True
        kwargs["dynamo"] = False
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; verification decides
        torch.onnx.export(module, args, str(path), **kwargs)


def _write_graphs(model: GPT, tmp: Path) -> None:
    portable = PortableGPT(model).eval()
    dtype = next(model.parameters()).dtype
    idx = sample_ids(model, 2, 7, seed=0)
    _, pk, pv = portable.decode(sample_ids(model, 2, 3, seed=5), *empty_cache(model, 2, dtype))
    seq = {0: "batch", 1: "seq"}
    _export(portable, (idx,), tmp / FORWARD_FILE, ["idx"], ["logits"], {"idx": seq, "logits": seq})
    cache_in, cache_out = {1: "batch", 3: "past"}, {1: "batch", 3: "total"}
    _export(_Decode(portable), (idx, pk, pv), tmp / DECODE_FILE, DECODE_INPUTS, DECODE_OUTPUTS,
            {"idx": seq, "logits": seq, "past_k": cache_in, "past_v": cache_in,
             "present_k": cache_out, "present_v": cache_out})


def session(path: Path):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT's Fail / NotImplemented: an op or type this runtime lacks
        raise ExportError(f"{path.name}: ONNX Runtime cannot load it: {err}") from err


def _runner(sess, names: list[str]):
    def run(*tensors):
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        try:
            outs = sess.run(None, feeds)
        except Exception as err:
            raise ExportError(f"ONNX Runtime failed to run the graph: {err}") from err
        outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)
    return run


def _verify(model: GPT, tmp: Path) -> list[Comparison]:
    dtype = next(model.parameters()).dtype
    comps = check_forward(model, _runner(session(tmp / FORWARD_FILE), ["idx"]))
    empty = lambda b: empty_cache(model, b, dtype)  # noqa: E731
    return comps + check_decode(model, _runner(session(tmp / DECODE_FILE), DECODE_INPUTS), empty)


def export_onnx(model: GPT, out: str | Path, meta: dict, overwrite: bool = False) -> list[Comparison]:
    """Export `model` into the directory `out`, verify it with ONNX Runtime, then move it into place."""
    try:
        import onnxruntime  # noqa: F401  (verification needs it: refuse before any work)
    except ImportError as err:
        raise ExportError("ONNX export needs onnx and onnxruntime: pip install 'nanogpt-k8s[export]'") from err
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        raise ExportError("dtype bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernels for this graph's "
                          "ops (Add, MatMul), so the export could not be verified; use --dtype float16 or float32")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (use --force to overwrite)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            _write_graphs(model, tmp)
        except Exception as err:
            raise ExportError(f"ONNX export failed: {type(err).__name__}: {err}") from err
        comps = _verify(model, tmp)
        failed = [c for c in comps if not c.ok]
        if failed:
            raise ExportError("the exported ONNX graphs do not compute the model's logits:\n  "
                              + "\n  ".join(map(str, failed)))
        meta = {**meta, "opset": OPSET, "graphs": {
            "forward": {"file": FORWARD_FILE, "inputs": ["idx"], "outputs": ["logits"]},
            "decode": {"file": DECODE_FILE, "inputs": DECODE_INPUTS, "outputs": DECODE_OUTPUTS}},
            "verification": [str(c) for c in comps]}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)  # empty, or the caller asked to overwrite it
        os.replace(tmp, out)
        return comps
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
