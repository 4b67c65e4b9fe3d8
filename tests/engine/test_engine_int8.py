"""An int8 model (model/quant.py) through the engine: on CPU its linear layers run on the kernel's
int8 products (KernelInt8Linear) or, asked for, on the torch reference; both decode the tokens of
full recomputation through the torch reference, and a float-only layout is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from engine_helpers import ITOS, full_recompute_greedy, one_thread, tiny_model  # noqa: F401 (fixture)
from model.engine import Engine, EngineConfig, SamplingParams
from model.engine.cpu_setup import choose_cpu_linear
from model.gpt import GPT, GPTConfig
from model.kernels import cpu as cpukernels
from model.quant import Int8Linear, KernelInt8Linear, quantize_model
from model.tokenizer import CharTokenizer


def int8_model(n_embd: int = 128, dtype: torch.dtype = torch.float32) -> GPT:
    """Random weights wide enough for two groups of 64 a row (n_embd 128), logits decisive."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=40, n_layer=2, n_head=4, n_embd=n_embd))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.eval().tokenizer = CharTokenizer(ITOS)
    return quantize_model(model, dtype=dtype)


async def _greedy(model: GPT, cpu_linear: str, prompt: list[int], n: int) -> tuple[list[int], Engine]:
    engine = Engine(model, EngineConfig(max_batch=2, max_queue=4, cuda_graphs=False, seed=0, cpu_linear=cpu_linear))
    await engine.start()
    try:
        result = await engine.submit(prompt, SamplingParams(max_new_tokens=n, temperature=0)).result()
    finally:
        await engine.stop()
    return result.token_ids, engine


async def test_an_int8_model_decodes_as_full_recomputation():
    model = quantize_model(tiny_model(block_size=64))
    prompt = model.tokenizer.encode("the cat sat")
    tokens, _ = await _greedy(model, "auto", prompt, 12)
    assert tokens == full_recompute_greedy(model, prompt, 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
async def test_the_int8_kernel_decodes_the_torch_references_greedy_text(dtype):
    model = int8_model(dtype=dtype)
    prompt = model.tokenizer.encode("the quick brown fox")
    want = full_recompute_greedy(model, prompt, 48)  # every product through Int8Linear's torch reference
    kernel_tokens, engine = await _greedy(copy.deepcopy(model), "kernel", prompt, 48)
    assert engine.cpu_linear == "kernel"
    layers = [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(type(m) is KernelInt8Linear for m in layers)
    torch_tokens, engine = await _greedy(copy.deepcopy(model), "out_in", prompt, 48)
    assert engine.cpu_linear == "out_in" and type(engine.model.lm_head) is Int8Linear
    assert kernel_tokens == torch_tokens == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
async def test_the_engine_runs_an_int8_models_blocks_as_one_op_with_the_modules_tokens(monkeypatch, dtype):
    """After the engine's CPU set-up (the int8 kernel, then the fused attention and its stack),
    every one-token step of an int8 model runs its blocks in decode_blocks_int8, and greedy text
    is the block modules' own (the stack kept out)."""
    model = int8_model(dtype=dtype)
    prompt = model.tokenizer.encode("the quick brown fox")
    calls, op = [], torch.ops.nanogpt.decode_blocks_int8
    monkeypatch.setattr(torch.ops.nanogpt, "decode_blocks_int8", lambda *a: calls.append(a[0].shape[0]) or op(*a))
    fused_tokens, engine = await _greedy(copy.deepcopy(model), "kernel", prompt, 24)
    stack = engine.model.decode_stack
    assert engine.cpu_attention == "kernel" and stack is not None and stack.int8
    with torch.inference_mode():  # as the engine's steps run
        assert stack.applies(1, engine.runner.cache.k)
    assert len(calls) >= 23 and set(calls) == {1}  # the warm-up's step, then one a new token after the first
    calls.clear()
    monkeypatch.setattr(cpukernels.DecodeStack, "applies", lambda self, B, k_cache: False)
    module_tokens, _ = await _greedy(copy.deepcopy(model), "kernel", prompt, 24)
    assert calls == []
    assert fused_tokens == module_tokens


def test_batch_invariant_mode_sends_every_int8_product_to_the_kernel():
    model = int8_model()
    assert choose_cpu_linear(model, "auto", every_row=True) == "kernel"
    assert model.lm_head.kernel_max_rows == cpukernels.EVERY_ROW


def test_the_float_only_layout_is_refused_for_int8_weights():
    with pytest.raises(ValueError, match="cpu_linear 'in_out' needs float weights"):
        choose_cpu_linear(quantize_model(tiny_model()), "in_out")


@pytest.mark.parametrize("wide_wins", [True, False])
def test_the_reference_computes_half_precision_in_float32_where_that_is_faster(monkeypatch, wide_wins):
    """The CPU set-up times the torch reference's product at a prefill's rows in the model's dtype
    and in float32 (timings faked here: (own, float32) seconds) and sets every Int8Linear's
    compute_dtype to the faster; a float32 model has nothing to choose and times nothing."""
    from model.engine import cpu_setup
    timed = []
    monkeypatch.setattr(cpu_setup, "_interleaved_best_seconds",
                        lambda a, b, rounds=3: timed.append(rounds) or ((2.0, 1.0) if wide_wins else (1.0, 2.0)))
    model = int8_model(dtype=torch.bfloat16)
    assert cpu_setup._int8_compute_dtype(model) == (torch.float32 if wide_wins else None) and timed
    monkeypatch.setattr(cpu_setup, "_int8_compute_dtype", lambda m: torch.float32 if wide_wins else None)
    choose_cpu_linear(model, "out_in")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 9 and all(m.compute_dtype == (torch.float32 if wide_wins else None) for m in layers)
    timed.clear()
    monkeypatch.undo()
    monkeypatch.setattr(cpu_setup, "_interleaved_best_seconds", lambda *a, **k: timed.append(1) or (1.0, 1.0))
    assert cpu_setup._int8_compute_dtype(int8_model(dtype=torch.float32)) is None and not timed
