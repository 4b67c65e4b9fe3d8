"""CUDA set-up the engine does at start-up: what runs the decode step (model/kernels/
triton_decode.py's kernels or torch's operators). Why: docs/engine.md, "Fused CUDA decode"."""

from __future__ import annotations

import logging

from model.engine.config import CUDA_KERNELS_CHOICES
from model.gpt import GPT
from model.kernels import triton_decode, triton_int8
from model.quant import Int8Linear

log = logging.getLogger(__name__)


def choose_cuda_kernels(model: GPT, choice: str = "auto") -> str:
    """Install the Triton decode path ("triton") or leave torch's operators ("torch"); "auto"
    is triton where it imports. Returns what runs. Asked for by name, triton that cannot be
    imported is an error; under "auto" it is logged and torch's operators stay."""
    if choice not in CUDA_KERNELS_CHOICES:
        raise ValueError(f"cuda_kernels must be one of {', '.join(CUDA_KERNELS_CHOICES)}, got {choice!r}")
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if int8:  # int8 layers: their own Triton product on torch's decode structure (the fused path reads floats)
        why = None if choice == "torch" or triton_int8.available() else "triton is not importable"
        if choice == "triton" and why:
            raise ValueError(f"cuda_kernels 'triton': {why}")
        for m in int8:
            m.use_triton = choice != "torch" and not why
        triton_decode.use_triton_decode(model, on=False)
        log.info("CUDA decode: torch's operators, int8 products on %s", "Triton" if int8[0].use_triton else "torch")
        return "torch"
    if choice != "torch":
        try:
            triton_decode.use_triton_decode(model)
            log.info("CUDA decode: Triton kernels, five launches a block; graphs per batch size only")
            return "triton"
        except triton_decode.TritonUnavailable as err:
            if choice == "triton":
                raise ValueError(f"cuda_kernels 'triton': {err}") from err
            log.warning("%s; CUDA decode uses torch's operators", err)
    triton_decode.use_triton_decode(model, on=False)
    log.info("CUDA decode: torch's operators; graphs per batch size and cache length")
    return "torch"
