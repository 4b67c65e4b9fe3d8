"""model/engine/cuda_setup.py: CUDA_KERNELS picks what runs the CUDA decode step. The choice
and its hooks are checked here on a CPU model (the hooks then apply to CUDA caches only);
the kernels themselves: tests/kernels/test_triton_decode.py, and on a GPU bench/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import tiny_model
from model.engine.config import EngineConfig
from model.engine.cuda_setup import choose_cuda_kernels
from model.kernels import triton_decode


def hooks(model):
    return model.decode_stack, [b.attn.decode_attention for b in model.transformer.h]


def test_auto_installs_the_triton_path_for_cuda_caches_only_and_torch_takes_it_back():
    pytest.importorskip("triton")
    model = tiny_model()
    assert choose_cuda_kernels(model, "auto") == "triton"
    stack, attention = hooks(model)
    assert isinstance(stack, triton_decode.TritonDecodeStack) and all(a is not None for a in attention)
    assert not stack.applies(1, torch.zeros(1))  # a CPU cache: the model's own operators run
    assert choose_cuda_kernels(model, "torch") == "torch"
    assert hooks(model) == (None, [None, None])


def test_triton_that_cannot_be_imported_is_an_error_by_name_and_a_fallback_under_auto(monkeypatch, caplog):
    monkeypatch.setattr(triton_decode, "available", lambda: "triton is not importable: ImportError: nope")
    model = tiny_model()
    with pytest.raises(ValueError, match="cuda_kernels 'triton': triton is not importable"):
        choose_cuda_kernels(model, "triton")
    assert choose_cuda_kernels(model, "auto") == "torch"
    assert hooks(model) == (None, [None, None])
    assert "CUDA decode uses torch's operators" in caplog.text


def test_bad_choice_names_the_field():
    with pytest.raises(ValueError, match="cuda_kernels must be one of auto, triton, torch, got 'cutlass'"):
        EngineConfig(cuda_kernels="cutlass").validate()
    with pytest.raises(ValueError, match="cuda_kernels must be one of"):
        choose_cuda_kernels(tiny_model(), "cutlass")


def test_the_server_setting_reaches_the_engine_config():
    from server.config import ConfigError, load_config
    assert load_config([], {"CUDA_KERNELS": "torch"}).cuda_kernels == "torch"
    assert load_config([], {}).cuda_kernels == "torch"  # until the Triton path has run on a GPU
    with pytest.raises(ConfigError, match="CUDA_KERNELS"):
        load_config([], {"CUDA_KERNELS": "flash"})


def test_the_triton_path_samples_every_batch_by_the_fused_kernel(monkeypatch):
    """ModelRunner._sample on the Triton path (set by hand: the kernel runs on CPU tensors under
    the interpreter): one launch for temperature/top-k batches and for top-p ones, with today's
    tokens (these seeded logits sit far from any top-p boundary)."""
    pytest.importorskip("triton")
    if not triton_decode.interpreting():
        pytest.skip("needs Triton's interpreter (tests/conftest.py sets it on hosts without CUDA)")
    from model.engine.runner import ModelRunner
    from model.sampling import BatchParams, SamplingParams, sample
    runner = ModelRunner(tiny_model(), EngineConfig(max_batch=2))
    runner.cuda_kernels = "triton"
    launches, launch = [], triton_decode._launch
    monkeypatch.setattr(triton_decode, "_launch", lambda kernel, *a, **kw: launches.append(kernel) or launch(kernel, *a, **kw))
    torch.manual_seed(0)
    logits, step = torch.randn(2, 40) * 3, torch.tensor([3, 9])
    for rows in ([SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=0.0)],
                 [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams()]):
        launches.clear()
        bp = BatchParams.build(rows, [11, 12], torch.device("cpu"))
        assert torch.equal(runner._sample(logits, bp, step), sample(logits, bp, step, runner.n_vocab))
        assert len(launches) == 1


def test_an_int8_model_keeps_torchs_decode_structure_and_its_int8_products_follow_the_choice():
    # The fused kernels read float weights: an int8 model never gets them, and its Int8Linear layers use
    # their own Triton product only when CUDA_KERNELS asks for Triton (torch, the default, keeps torch's).
    pytest.importorskip("triton")
    from model.quant import Int8Linear, quantize_model

    model = tiny_model()
    quantize_model(model)
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert int8
    for choice, triton_products in (("auto", True), ("torch", False), ("triton", True)):
        assert choose_cuda_kernels(model, choice) == "torch"
        assert hooks(model) == (None, [None, None])
        assert all(m.use_triton is triton_products for m in int8), choice
    with pytest.raises(triton_decode.TritonUnavailable, match="int8"):
        triton_decode.use_triton_decode(model)
