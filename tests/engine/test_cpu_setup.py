"""The engine's CPU set-up (model/engine/cpu_setup.py): what runs the linear layers and the
one-token attention (model/kernels/cpu.py's kernels or torch's), the weights' layout and arena,
and batch-invariant mode."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from model.engine import cpu_setup
from model.engine.cpu_setup import choose_cpu_attention, choose_cpu_linear
from model.gpt import GPT, GPTConfig, KVCache, StepPart, kv_cache_dtype
from model.kernels import cpu as cpukernels
from tiny_gpt import small_gpt

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the kernel is x86-64 (AVX2) only")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative to the largest output


@pytest.fixture(scope="module", autouse=True)
def kernel():
    cpukernels.load()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_with_the_kernel_tracks_torch(dtype):
    torch_model, kernel_model = small_gpt().to(dtype), small_gpt().to(dtype)
    assert choose_cpu_linear(torch_model, "out_in") == "out_in"
    assert choose_cpu_linear(kernel_model, "kernel") == "kernel"
    seq = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    with torch.inference_mode():
        for m in (torch_model, kernel_model):
            cache = KVCache(m.config, 2, dtype=dtype)
            m.step(seq[:, :8], torch.zeros(2, dtype=torch.long), cache)
            logits.append(torch.cat([m.step(seq[:, i:i + 1], torch.full((2,), i), cache) for i in range(8, 12)], 1))
    scale = logits[0].float().abs().max()
    assert (logits[0].float() - logits[1].float()).abs().max() <= 4 * TOL[dtype] * scale


def candidate_being_timed(model) -> str:
    """Which of choose_cpu_linear's options the model is set up as while it is timed."""
    w = model.lm_head.weight
    return ("kernel" if isinstance(model.lm_head, cpukernels.KernelLinear) else
            "in_out" if w.stride() == (1, w.shape[0]) else "out_in")


@pytest.mark.slow
def test_auto_times_every_option_on_the_whole_model_and_keeps_the_fastest(monkeypatch, caplog):
    model = small_gpt()
    timed = []

    def fake_pass(m, give_up):  # "in_out" wins
        kind = candidate_being_timed(m)
        timed.append(kind)
        return {"out_in": 3.0, "in_out": 1.0, "kernel": 2.0}[kind]
    monkeypatch.setattr(cpu_setup, "_decode_pass_seconds", fake_pass)
    caplog.set_level("INFO", logger="model.engine.cpu_setup")
    assert choose_cpu_linear(model, "auto") == "in_out"
    assert timed == ["out_in", "kernel", "in_out", "in_out", "kernel", "out_in"]  # two rounds
    assert not any(isinstance(m, cpukernels.KernelLinear) for m in model.modules())
    assert all(m.weight.stride() == (1, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert "out_in 3000.0, kernel 2000.0, in_out 1000.0" in caplog.text
    with torch.inference_mode():  # and the model still computes what it computed before
        torch.testing.assert_close(model(torch.arange(5)[None])[0], small_gpt()(torch.arange(5)[None])[0])


@pytest.mark.parametrize("kernel_s,chosen", [(1.05, "kernel"), (1.2, "out_in")])
def test_the_kernel_wins_near_ties_for_the_block_op_it_enables(monkeypatch, kernel_s, chosen):
    """The timed pass leaves out what only the kernel gives (a block's decode step as one op):
    torch's F.linear must be more than 10% faster to be chosen."""
    seconds = {"out_in": 1.0, "in_out": 2.0, "kernel": kernel_s}
    monkeypatch.setattr(cpu_setup, "_decode_pass_seconds", lambda m, give_up: seconds[candidate_being_timed(m)])
    monkeypatch.setattr(cpu_setup, "_kernel_max_rows", lambda model: 8)
    assert choose_cpu_linear(small_gpt(), "auto") == chosen


def test_a_burst_of_noise_in_one_timing_does_not_decide(monkeypatch):
    """Each option is timed twice, in two rounds, and keeps its best: the kernel timed 3x
    slow once (the host busy elsewhere) is still chosen on its other timing."""
    kernel_times = iter([3.0, 0.5])
    seconds = {"out_in": lambda: 1.0, "in_out": lambda: 2.0, "kernel": lambda: next(kernel_times)}
    monkeypatch.setattr(cpu_setup, "_decode_pass_seconds", lambda m, give_up: seconds[candidate_being_timed(m)]())
    monkeypatch.setattr(cpu_setup, "_kernel_max_rows", lambda model: 8)
    assert choose_cpu_linear(small_gpt(), "auto") == "kernel"


def test_kernel_rows_double_while_the_kernel_wins(monkeypatch):
    """Timings (kernel, torch) per doubling: 16 rows kernel faster, 32 faster, 64 slower."""
    timings = iter([(1.0, 2.0), (1.0, 1.5), (2.0, 1.0)])
    monkeypatch.setattr(cpu_setup, "_interleaved_best_seconds", lambda a, b: next(timings))
    assert cpu_setup._kernel_max_rows(small_gpt()) == 32
    timings = iter([(2.0, 1.0)])  # torch already wins at 16 rows
    assert cpu_setup._kernel_max_rows(small_gpt()) == cpukernels.BLOCK_ROWS
    timings = iter([(1.0, 2.0)] * 10)  # the kernel always wins: up to the limit
    assert cpu_setup._kernel_max_rows(small_gpt(), limit=64) == 64


def test_interleaved_timing_takes_turns_and_keeps_each_sides_best(monkeypatch):
    """Calls alternate a, b, a, b, ... (a warm-up of each first, untimed); a slow call on one
    side does not count against it when another of its calls was fast."""
    calls, clock = [], iter([0.0, 0.0,             # the warm-up calls' starts (not timed)
                             0.0, 5.0, 5.0, 5.5,   # round 1: a slow (5 s), b 0.5 s
                             6.0, 7.0, 7.0, 7.5,   # round 2: a 1 s, b 0.5 s
                             8.0, 9.0, 9.0, 9.25])  # round 3: a 1 s, b 0.25 s
    monkeypatch.setattr(cpu_setup.time, "perf_counter", lambda: next(clock))
    best = cpu_setup._interleaved_best_seconds(lambda: calls.append("a"), lambda: calls.append("b"))
    assert calls == ["a", "b"] * 4 and best == (1.0, 0.25)


def test_kernel_by_name_measures_its_row_limit():
    model = small_gpt()
    assert choose_cpu_linear(model, "kernel") == "kernel"
    limits = {m.kernel_max_rows for m in model.modules() if isinstance(m, cpukernels.KernelLinear)}
    assert len(limits) == 1 and limits.pop() in (8, 16, 32, 64, 128, 256, 512)


def test_auto_falls_back_to_torch_and_kernel_by_name_fails_where_it_cannot_build(monkeypatch):
    monkeypatch.setattr(cpukernels, "_loaded", False)
    monkeypatch.setattr(cpukernels, "_error", "needs a C++ compiler (c++ not found; set CXX)")
    model = small_gpt()
    assert choose_cpu_linear(model, "auto") in ("out_in", "in_out")
    assert not any(isinstance(m, cpukernels.KernelLinear) for m in model.modules())
    with pytest.raises(cpukernels.KernelUnavailable, match="unavailable: needs a C\\+\\+ compiler"):
        choose_cpu_linear(model, "kernel")
    with pytest.raises(ValueError, match="cpu_linear must be one of auto, kernel, out_in, in_out"):
        choose_cpu_linear(model, "fast")


def test_in_out_layout_keeps_values():
    model = small_gpt()
    before = model.lm_head.weight.detach().clone()
    assert choose_cpu_linear(model, "in_out") == "in_out"
    assert model.lm_head.weight.stride() == (1, 97) and torch.equal(model.lm_head.weight, before)
    assert choose_cpu_linear(model, "out_in") == "out_in"
    assert model.lm_head.weight.is_contiguous() and torch.equal(model.lm_head.weight, before)


def forbid_torch_products(monkeypatch):
    """Fail any call of torch's own linear or attention: batch-invariant mode must not take them."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch's linear/attention called in batch-invariant mode")
    monkeypatch.setattr(F, "linear", refuse)
    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_invariant_mode_gives_a_token_the_same_bits_in_any_step(monkeypatch, dtype):
    """GPT-2's widths (768, 3072), where torch's GEMMs change a row's last bits with the rows
    beside it (on this project's Xeon: bfloat16 from 33 rows, float32 K=3072 from 512): in
    batch-invariant mode a prompt's logits are the same alone, beside a 600-token prompt, and
    in chunks, and a decode row the same at batch 1 and 40."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, vocab_size=256, n_layer=2, n_head=12, n_embd=768)
    model = GPT(config).to(dtype).eval()
    with torch.no_grad():
        assert choose_cpu_linear(model, "auto", every_row=True) == "kernel"
        assert choose_cpu_attention(model, "auto", chunks=True) == "kernel"
    assert all(m.kernel_max_rows == cpukernels.EVERY_ROW for m in model.modules() if isinstance(m, torch.nn.Linear))
    forbid_torch_products(monkeypatch)
    g = torch.Generator().manual_seed(1)
    prompt, other = torch.randint(0, 256, (1, 60), generator=g), torch.randint(0, 256, (1, 600), generator=g)
    zero = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        cache = KVCache(config, 40, dtype=dtype)
        alone = model.step(prompt, zero, cache)
        beside = model.step_parts([StepPart(other, zero, row0=1, logits=None), StepPart(prompt, zero)], cache)[1]
        model.step(prompt[:, :23], zero, cache, last_only=True)  # a chunk of 23, then the other 37
        chunked = model.step(prompt[:, 23:], zero + 23, cache)
        assert torch.equal(alone, beside) and torch.equal(alone[:, 23:], chunked)
        token = torch.tensor([[7]])
        one = model.step(token, zero + 60, cache)  # row 0, after its prompt
        many = model.step(torch.full((40, 1), 7), torch.full((40,), 60), cache)  # rows 0-39 at once
        assert torch.equal(one[0], many[0])


def test_batch_invariant_mode_refuses_what_contradicts_it():
    model = small_gpt()
    with pytest.raises(ValueError, match="cpu_linear 'out_in' contradicts it"):
        choose_cpu_linear(model, "out_in", every_row=True)
    with pytest.raises(ValueError, match="cpu_attention 'torch' contradicts it"):
        choose_cpu_attention(model, "torch", chunks=True)
    odd = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=12))  # head_dim 6
    with pytest.raises(ValueError, match="head_dim that is a multiple of 8 .*this model's is 6"):
        choose_cpu_attention(odd, "auto", chunks=True)
    with torch.no_grad():  # a set-up kept from before must not pass for an invariant one, nor back
        choose_cpu_linear(model, "kernel")
        assert model.lm_head.kernel_max_rows < cpukernels.EVERY_ROW
        choose_cpu_linear(model, "kernel", every_row=True)
        assert model.lm_head.kernel_max_rows == cpukernels.EVERY_ROW
        choose_cpu_linear(model, "auto")
        assert getattr(model.lm_head, "kernel_max_rows", 0) < cpukernels.EVERY_ROW


def test_cache_dtype_follows_the_attention_path_and_auto_falls_back(monkeypatch):
    model = small_gpt().to(torch.bfloat16)
    assert choose_cpu_attention(model, "auto") == "kernel" and kv_cache_dtype(model) == torch.bfloat16
    assert choose_cpu_attention(model, "torch") == "torch" and kv_cache_dtype(model) == torch.float32
    assert kv_cache_dtype(small_gpt()) == torch.float32
    monkeypatch.setattr(cpukernels, "_loaded", False)
    monkeypatch.setattr(cpukernels, "_error", "needs ninja (pip install ninja)")
    assert choose_cpu_attention(model, "auto") == "torch"
    with pytest.raises(cpukernels.KernelUnavailable, match="needs ninja"):
        choose_cpu_attention(model, "kernel")
    with pytest.raises(ValueError, match="cpu_attention must be one of auto, kernel, torch"):
        choose_cpu_attention(model, "flash")


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_weights_move_into_one_arena_keeping_values_parameters_and_tying(layout):
    model = small_gpt()
    cpu_setup._set_cpu_linear(model, layout)
    params = {name: (p, p.detach().clone(), p.stride()) for name, p in model.named_parameters()}
    x = torch.randint(0, 97, (1, 5))
    logits = model(x)[0]
    moved = cpu_setup.pack_in_huge_pages(model)
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert moved >= sum(w.nbytes for w in set(linears))
    starts = sorted(w.data_ptr() for w in set(linears))
    assert starts[-1] - starts[0] < moved  # all inside one mapping
    for name, p in model.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1]) and p.stride() == params[name][2]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model(x)[0], logits)


def test_weights_stay_where_the_os_has_no_huge_page_advice(monkeypatch):
    model = small_gpt()
    monkeypatch.delattr(cpu_setup.mmap, "MADV_HUGEPAGE")
    before = model.lm_head.weight.data_ptr()
    assert cpu_setup.pack_in_huge_pages(model) == 0 and model.lm_head.weight.data_ptr() == before


def test_a_model_set_up_before_keeps_its_set_up_until_it_changes(monkeypatch):
    """A second engine on the same model neither times the layouts again nor copies the
    weights into a new arena; a model whose weights changed since is set up afresh."""
    model = small_gpt()
    timed = []

    def fake_pass(m, give_up):
        timed.append(candidate_being_timed(m))
        return {"out_in": 1.0, "in_out": 2.0, "kernel": 3.0}[timed[-1]]
    monkeypatch.setattr(cpu_setup, "_decode_pass_seconds", fake_pass)
    assert choose_cpu_linear(model, "auto") == "out_in" and len(timed) == 6
    where = [m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert choose_cpu_linear(model, "auto") == "out_in" and choose_cpu_linear(model, "out_in") == "out_in"
    assert len(timed) == 6 and [m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)] == where
    # asked by name for something else: set up as asked; then "auto" times again
    assert choose_cpu_linear(model, "in_out") == "in_out" and model.lm_head.weight.stride() == (1, 97)
    assert choose_cpu_linear(model, "auto") == "out_in" and len(timed) == 12
    # the same model in another dtype (new storage): timed again
    model.to(torch.bfloat16)
    assert choose_cpu_linear(model, "auto") == "out_in" and len(timed) == 18
    # a layer switched by hand since: set up again, not trusted
    cpukernels.use_kernel(model, on=True)
    assert choose_cpu_linear(model, "auto") == "out_in" and len(timed) == 24
    assert not any(isinstance(m, cpukernels.KernelLinear) for m in model.modules())
