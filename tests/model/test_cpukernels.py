"""The CPU kernels (model/cpukernels.py, model/csrc/): matrix-vector products and decode attention,
and the engine's choices of what runs them (model/fastpath.py)."""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import cpukernels
from model import fastpath
from model.fastpath import choose_cpu_attention, choose_cpu_linear, kv_cache_dtype
from model.gpt import GPT, GPTConfig, KVCache, StepPart

# This project's machines and CI are x86-64 with AVX2, a C++ compiler and ninja: there the
# kernel must build, and a failure to build is a test failure, not a skip.
pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the kernel is x86-64 (AVX2) only")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPUINFO = Path("/proc/cpuinfo")
CPU_FLAGS = next((line.split(":", 1)[1].split()
                  for line in (CPUINFO.read_text() if CPUINFO.exists() else "").splitlines()
                  if line.startswith("flags")), [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative to the largest output


@pytest.fixture(scope="module", autouse=True)
def kernel():
    cpukernels.load()


def reference(x, w, b):
    """float32 math on the same (rounded) inputs."""
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@pytest.fixture(params=["native", "avx2"])
def isa(request, monkeypatch):
    """Each kernel test on the CPU's own vector instructions (AVX-512 where it has them) and on
    AVX2, which the kernel reads from NANOGPT_CPU_ISA at each call."""
    if request.param == "avx2":
        monkeypatch.setenv("NANOGPT_CPU_ISA", "avx2")
    else:
        monkeypatch.delenv("NANOGPT_CPU_ISA", raising=False)
    return request.param


def test_the_kernel_says_which_instructions_it_runs_on(isa):
    assert cpukernels.isa() == ("avx2" if isa == "avx2" else
                                "avx512" if "avx512f" in CPU_FLAGS and "avx512bw" in CPU_FLAGS else "avx2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 24])  # 13, 24: several blocks of 8
# 13: not a multiple of 8 or 16; 1031 x 96: two threads' shares, each cut into runs of rows with some left over
@pytest.mark.parametrize("n_out,n_in", [(97, 64), (130, 768), (33, 13), (1031, 96)])
def test_matches_float32_reference(isa, dtype, rows, n_out, n_in):
    g = torch.Generator().manual_seed(rows * 1000 + n_in)
    w = torch.randn(n_out, n_in, generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype)
    x = torch.randn(rows, 1, n_in, generator=g).to(dtype)
    for bias in (b, None):
        y = cpukernels.linear_rows(x, w, bias)
        assert y.shape == (rows, 1, n_out) and y.dtype == dtype
        ref = reference(x, w, bias)
        assert (y.float() - ref).abs().max() <= TOL[dtype] * ref.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_row_gives_the_same_bits_alone_or_among_others(isa, dtype):
    """Each output is summed in the same order whatever the number of rows, so batching a
    sequence with others does not change its numbers at all (301 outputs: a block's last
    output row is left over from the groups of output rows taken together)."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(301, 256, generator=g).to(dtype), torch.randn(301, generator=g).to(dtype)
    x = torch.randn(21, 256, generator=g).to(dtype)
    together = cpukernels.linear_rows(x, w, b)
    for i in range(21):
        assert torch.equal(cpukernels.linear_rows(x[i:i + 1], w, b)[0], together[i])
    offset = torch.empty(21 * 256 + 1, dtype=dtype)[1:].view(21, 256).copy_(x)  # rows off the 64-byte grid
    assert torch.equal(cpukernels.linear_rows(offset, w, b), together)


def test_bad_inputs_are_refused_with_the_reason():
    w = torch.randn(16, 32)
    with pytest.raises(RuntimeError, match="x has no rows"):
        cpukernels.linear_rows(torch.randn(0, 32), w, None)
    with pytest.raises(RuntimeError, match="last dimension must be 32"):
        cpukernels.linear_rows(torch.randn(1, 31), w, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpukernels.linear_rows(torch.randn(1, 16), w.t(), None)
    with pytest.raises(RuntimeError, match="x is Half but weight is Float"):
        cpukernels.linear_rows(torch.randn(1, 32).half(), w, None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous vector of 16"):
        cpukernels.linear_rows(torch.randn(1, 32), w, torch.randn(15))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cpukernels.linear_rows(torch.randn(1, 32).double(), w.double(), None)


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def test_use_kernel_keeps_parameters_and_routes_only_small_inference_calls(monkeypatch):
    model = small_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    cpukernels.use_kernel(model)
    kernel_layers = [m for m in model.modules() if isinstance(m, cpukernels.KernelLinear)]
    assert len(kernel_layers) == 2 * 4 + 1  # four per block, and the head
    assert model.lm_head.weight is model.transformer.wte.weight and [id(p) for p in model.parameters()] == params
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    calls = []
    op = cpukernels.linear_rows
    monkeypatch.setattr(cpukernels, "linear_rows", lambda *a: calls.append(a[0].shape) or op(*a))
    with torch.inference_mode():
        model.step(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long), KVCache(model.config, 3))
    assert calls and all(s[:-1].numel() == 3 for s in calls)  # decode of three rows: the kernel
    calls.clear()
    with torch.inference_mode():
        model(torch.zeros(1, 9, dtype=torch.long))  # nine rows of prefill: beyond kernel_max_rows (8)
    assert not calls
    cpukernels.use_kernel(model, max_rows=16)
    with torch.inference_mode():
        model(torch.zeros(1, 9, dtype=torch.long))
    assert calls and all(s[:-1].numel() == 9 for s in calls)
    calls.clear()
    # a model moved off the CPU keeps its layers' class but not the kernel (meta: no device needed)
    calls.clear()
    layer = copy.deepcopy(next(m for m in model.modules() if isinstance(m, cpukernels.KernelLinear))).to("meta")
    with torch.inference_mode():
        out = layer(torch.empty(1, layer.in_features, device="meta"))
    assert isinstance(layer, cpukernels.KernelLinear) and out.shape == (1, layer.out_features) and out.is_meta
    assert not calls
    # training still works: with autograd on, everything goes through F.linear
    loss = model(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))[1]
    loss.backward()
    assert not calls and model.lm_head.weight.grad is not None
    cpukernels.use_kernel(model, on=False)
    assert not any(isinstance(m, cpukernels.KernelLinear) for m in model.modules())


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


def test_auto_times_every_option_on_the_whole_model_and_keeps_the_fastest(monkeypatch, caplog):
    model = small_gpt()
    timed = []

    def fake_pass(m, give_up):  # "in_out" wins
        kind = candidate_being_timed(m)
        timed.append(kind)
        return {"out_in": 3.0, "in_out": 1.0, "kernel": 2.0}[kind]
    monkeypatch.setattr(fastpath, "_decode_pass_seconds", fake_pass)
    caplog.set_level("INFO", logger="model.fastpath")
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
    monkeypatch.setattr(fastpath, "_decode_pass_seconds", lambda m, give_up: seconds[candidate_being_timed(m)])
    monkeypatch.setattr(fastpath, "_kernel_max_rows", lambda model: 8)
    assert choose_cpu_linear(small_gpt(), "auto") == chosen


def test_a_burst_of_noise_in_one_timing_does_not_decide(monkeypatch):
    """Each option is timed twice, in two rounds, and keeps its best: the kernel timed 3x
    slow once (the host busy elsewhere) is still chosen on its other timing."""
    kernel_times = iter([3.0, 0.5])
    seconds = {"out_in": lambda: 1.0, "in_out": lambda: 2.0, "kernel": lambda: next(kernel_times)}
    monkeypatch.setattr(fastpath, "_decode_pass_seconds", lambda m, give_up: seconds[candidate_being_timed(m)]())
    monkeypatch.setattr(fastpath, "_kernel_max_rows", lambda model: 8)
    assert choose_cpu_linear(small_gpt(), "auto") == "kernel"


def test_kernel_rows_double_while_the_kernel_wins(monkeypatch):
    """Timings (kernel, torch) per doubling: 16 rows kernel faster, 32 faster, 64 slower."""
    timings = iter([(1.0, 2.0), (1.0, 1.5), (2.0, 1.0)])
    monkeypatch.setattr(fastpath, "_interleaved_best_seconds", lambda a, b: next(timings))
    assert fastpath._kernel_max_rows(small_gpt()) == 32
    timings = iter([(2.0, 1.0)])  # torch already wins at 16 rows
    assert fastpath._kernel_max_rows(small_gpt()) == cpukernels.BLOCK_ROWS
    timings = iter([(1.0, 2.0)] * 10)  # the kernel always wins: up to the limit
    assert fastpath._kernel_max_rows(small_gpt(), limit=64) == 64


def test_interleaved_timing_takes_turns_and_keeps_each_sides_best(monkeypatch):
    """Calls alternate a, b, a, b, ... (a warm-up of each first, untimed); a slow call on one
    side does not count against it when another of its calls was fast."""
    calls, clock = [], iter([0.0, 0.0,             # the warm-up calls' starts (not timed)
                             0.0, 5.0, 5.0, 5.5,   # round 1: a slow (5 s), b 0.5 s
                             6.0, 7.0, 7.0, 7.5,   # round 2: a 1 s, b 0.5 s
                             8.0, 9.0, 9.0, 9.25])  # round 3: a 1 s, b 0.25 s
    monkeypatch.setattr(fastpath.time, "perf_counter", lambda: next(clock))
    best = fastpath._interleaved_best_seconds(lambda: calls.append("a"), lambda: calls.append("b"))
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


# --- decode attention ---------------------------------------------------------------

def attention_reference(q, k_cache, v_cache, rows, pos):
    """torch's attention over each row's own positions 0..pos, in float64."""
    out = []
    for b in range(q.shape[0]):
        keys = k_cache[rows[b], :, : pos[b] + 1].double()
        values = v_cache[rows[b], :, : pos[b] + 1].double()
        att = (q[b].double() @ keys.transpose(-1, -2)) / keys.shape[-1] ** 0.5  # (nh, 1, n)
        out.append((att.softmax(-1) @ values)[:, 0])  # (nh, hs)
    return torch.stack(out)


@pytest.mark.parametrize("cache_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 64, 72])  # 72: past one block of 64 accumulators
def test_decode_attention_writes_the_cache_and_attends_each_row_over_its_own_length(cache_dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    R, nh, S = 5, 3, 40
    k_cache = torch.randn(R, nh, S, head_dim, generator=g).to(cache_dtype)
    v_cache = torch.randn(R, nh, S, head_dim, generator=g).to(cache_dtype)
    rows, pos = torch.tensor([3, 0, 4]), torch.tensor([17, 0, 39])  # scattered rows, first and last positions
    q, k, v = (torch.randn(3, nh, 1, head_dim, generator=g).to(cache_dtype) for _ in range(3))
    untouched = k_cache.clone()
    y = cpukernels.decode_attention(q, k, v, k_cache, v_cache, rows, pos)
    assert y.shape == (3, 1, nh, head_dim) and y.dtype == cache_dtype
    for b in range(3):  # the new key and value landed, and nothing else moved
        assert torch.equal(k_cache[rows[b], :, pos[b]], k[b, :, 0]) and torch.equal(v_cache[rows[b], :, pos[b]], v[b, :, 0])
        untouched[rows[b], :, pos[b]] = k[b, :, 0]
    assert torch.equal(k_cache, untouched)
    want = attention_reference(q[:, :, 0:1], k_cache, v_cache, rows, pos)
    assert (y[:, 0].double() - want).abs().max() <= 2 * TOL[cache_dtype] * want.abs().max()


@pytest.mark.parametrize("cache_dtype", DTYPES, ids=str)
def test_attention_over_a_chunk_gives_each_token_the_bits_of_one_token_steps(cache_dtype):
    """T new tokens a row in one call: each attends over the positions up to its own, with the
    very numbers of T one-token calls (what batch-invariant mode rests on)."""
    g = torch.Generator().manual_seed(11)
    R, nh, S, hs, T = 4, 2, 40, 24, 7
    k_cache = torch.randn(R, nh, S, hs, generator=g).to(cache_dtype)
    v_cache = torch.randn(R, nh, S, hs, generator=g).to(cache_dtype)
    rows, pos = torch.tensor([2, 0]), torch.tensor([9, 33])  # scattered rows; the second chunk ends at S - 1
    qkv = torch.randn(2, T, 3, nh, hs, generator=g).to(cache_dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, T, hs) views, as GPT._heads gives
    k_steps, v_steps = k_cache.clone(), v_cache.clone()
    y = cpukernels.decode_attention(q, k, v, k_cache, v_cache, rows, pos)
    assert y.shape == (2, T, nh, hs)
    for t in range(T):
        one = cpukernels.decode_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], k_steps, v_steps,
                                          rows, pos + t)
        assert torch.equal(y[:, t], one[:, 0])
    assert torch.equal(k_cache, k_steps) and torch.equal(v_cache, v_steps)
    want = attention_reference(q[:, :, -1:], k_cache, v_cache, rows, pos + T - 1)  # the last token, causally
    assert (y[:, -1].double() - want).abs().max() <= 2 * TOL[cache_dtype] * want.abs().max()


def test_decode_attention_of_a_row_does_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(4, 2, 30, 16, generator=g), torch.randn(4, 2, 30, 16, generator=g)
    q, k, v = (torch.randn(4, 2, 1, 16, generator=g) for _ in range(3))
    rows, pos = torch.arange(4), torch.tensor([5, 29, 0, 12])
    together = cpukernels.decode_attention(q, k, v, k_cache, v_cache, rows, pos)
    for b in range(4):
        alone = cpukernels.decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], k_cache, v_cache, rows[b:b + 1],
                                            pos[b:b + 1])
        assert torch.equal(alone[0], together[b])
    assert torch.equal(cpukernels.decode_attention(q, k, v, k_cache, v_cache, None, pos), together)  # rows 0..B-1
    meta = [t.to("meta") for t in (q, k, v, k_cache, v_cache)]
    assert cpukernels.decode_attention(*meta, None, pos) is None  # off the CPU: not applicable


def test_decode_attention_refuses_bad_inputs_with_the_reason():
    cache = torch.zeros(2, 2, 8, 16)
    q = torch.zeros(1, 2, 1, 16)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="positions 8..8 outside 0..7"):
        cpukernels.decode_attention(q, q, q, cache, cache.clone(), one, torch.tensor([8]))
    chunk = torch.zeros(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="positions 5..8 outside 0..7"):  # a chunk must fit the row too
        cpukernels.decode_attention(chunk, chunk, chunk, cache, cache.clone(), one, torch.tensor([5]))
    with pytest.raises(RuntimeError, match="row 2 outside the cache's 2"):
        cpukernels.decode_attention(q, q, q, cache, cache.clone(), torch.tensor([2]), one)
    with pytest.raises(RuntimeError, match="head_dim must be a multiple of 8, got 12"):
        cpukernels.decode_attention(*(torch.zeros(1, 2, 1, 12),) * 3, torch.zeros(2, 2, 8, 12),
                                    torch.zeros(2, 2, 8, 12), one, one)
    with pytest.raises(RuntimeError, match="q, k and v dtypes differ"):
        cpukernels.decode_attention(q, q.half(), q, cache, cache.clone(), one, one)
    with pytest.raises(RuntimeError, match="int64 vectors of 1"):
        cpukernels.decode_attention(q, q, q, cache, cache.clone(), one.int(), one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpt_step_with_the_fused_attention_tracks_torch(dtype):
    """Prefill with torch's attention, then one-token steps fused, over contiguous rows and over
    scattered rows; the logits follow torch's own one-token steps."""
    seq = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    for rows in (None, torch.tensor([2, 0])):
        logits = []
        for fused in (False, True):
            m = small_gpt().to(dtype)
            cpukernels.use_decode_attention(m, fused)
            cache = KVCache(m.config, 3, dtype=dtype)
            with torch.inference_mode():
                m.step(seq[:, :8], torch.zeros(2, dtype=torch.long), cache, rows=rows)
                logits.append(torch.cat([m.step(seq[:, i:i + 1], torch.full((2,), i), cache, rows=rows)
                                         for i in range(8, 12)], 1).float())
        assert (logits[0] - logits[1]).abs().max() <= 4 * TOL[dtype] * logits[0].abs().max()


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


def test_noise_uniform_equals_the_samplers_tensor_ops(monkeypatch):
    """sampling.gumbel_noise on a CPU with the kernels takes its uniforms from sampling.cpp in
    one pass; they equal the tensor ops' to the bit, for a shared candidate list and per row."""
    from model import sampling
    g = torch.Generator().manual_seed(5)
    seed, step = torch.randint(0, 2**32, (6,), generator=g), torch.randint(0, 10**6, (6,), generator=g)
    for ids in (torch.arange(5000), torch.randint(0, 50257, (6, 40), generator=g)):
        fast = sampling.gumbel_noise(seed, step, ids)
        monkeypatch.setattr(cpukernels, "_loaded", False)  # what a CPU without the kernels computes
        assert cpukernels.noise_uniform(seed, ids) is None
        slow = sampling.gumbel_noise(seed, step, ids)
        monkeypatch.setattr(cpukernels, "_loaded", True)
        assert torch.equal(fast, slow) and fast.shape == (6, ids.shape[-1])
    with pytest.raises(RuntimeError, match="token_ids must be"):
        cpukernels.noise_uniform(seed, torch.zeros(2, 3, dtype=torch.long))


def test_argmax_gives_torchs_ids_ties_nans_and_infinities_included(monkeypatch):
    """sampling.cpp's argmax answers as torch.argmax does: the first largest, the first NaN where
    a row has one, -inf and +inf as values; rows of every length (the vector loop's tail), a
    non-contiguous view; and what sampling picks with it equals what it picks without."""
    from model import sampling
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-3, 4, (40, 50257), generator=g).float()  # many ties for the largest
    x[1, 7], x[1, 9000] = float("nan"), float("nan")
    x[2, 50256] = float("nan")  # in the tail past the last full vector
    x[3] = float("-inf")
    x[4, 123], x[4, 50000] = float("inf"), float("inf")
    x[5, 50250:] = 9.0  # the largest only in the tail
    for rows in (x, x[:, :50251], x[:, 1:13], x[:, :1], x[::3, 100:], x.t().contiguous().t()[:7]):
        assert torch.equal(cpukernels.argmax(rows), rows.argmax(dim=-1)), rows.shape
    assert cpukernels.argmax(x.double()) is None and cpukernels.argmax(x[0]) is None
    logits = torch.randn(9, 50257, generator=g).to(torch.bfloat16).float()  # bfloat16 ties
    mix = [sampling.SamplingParams(temperature=0.0 if i % 2 else 0.9) for i in range(9)]  # the race too
    bp = sampling.BatchParams.build(mix, list(range(9)), "cpu")
    fast = sampling.sample(logits, bp, torch.zeros(9, dtype=torch.long), 50257)
    monkeypatch.setattr(cpukernels, "_loaded", False)  # what a CPU without the kernels computes
    assert cpukernels.argmax(logits) is None
    assert torch.equal(fast, sampling.sample(logits, bp, torch.zeros(9, dtype=torch.long), 50257))


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


def fused_steps_counted(monkeypatch) -> list[int]:
    """Counts the decode steps that the fused op (every block at once) ran, as a list of one int."""
    runs, inner = [0], cpukernels.DecodeStack.__call__

    def counting(*args):
        runs[0] += 1
        return inner(*args)
    monkeypatch.setattr(cpukernels.DecodeStack, "__call__", counting)
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias,gelu", [(True, "none"), (False, "tanh")])
def test_decode_blocks_gives_the_bits_of_the_blocks_own_modules(monkeypatch, dtype, bias, gelu):
    """The fused step is the same ops in the same order: logits and caches are equal to the
    bit to those of the modules called one by one, for batches of 1 and 3, at row 0 and beyond."""
    runs = fused_steps_counted(monkeypatch)
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32, bias=bias, gelu_approximate=gelu)
    model = GPT(config).to(dtype).eval()
    seq = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    for B, row0 in ((1, 0), (3, 0), (2, 1)):
        results = []
        for fused in (False, True):
            m = copy.deepcopy(model)
            cpukernels.use_kernel(m)
            cpukernels.use_decode_attention(m)
            if not fused:
                m.decode_stack = None
            cache = KVCache(config, 3, dtype=dtype)
            with torch.inference_mode():
                m.step(seq[:B, :8], torch.zeros(B, dtype=torch.long), cache, row0=row0)
                logits = [m.step(seq[:B, i:i + 1], torch.full((B,), i), cache, row0=row0) for i in range(8, 12)]
            results.append((torch.cat(logits, 1), cache.k, cache.v))
        assert all(torch.equal(a, b) for a, b in zip(*results))
        assert results[1][1][:, row0:row0 + B].abs().sum() > 0  # the fused steps wrote the rows asked
    assert runs[0] == 3 * 4  # batches x steps: the fused op did run


def test_decode_blocks_stays_out_where_it_does_not_apply(monkeypatch):
    """Prompt chunks, scattered rows, batches past the kernel's rows and torch's linear layers
    take the modules; the results are the same either way."""
    runs = fused_steps_counted(monkeypatch)
    m = small_gpt()
    cpukernels.use_kernel(m, max_rows=2)
    cpukernels.use_decode_attention(m)
    cache = KVCache(m.config, 3)
    with torch.inference_mode():
        m.step(torch.ones(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), cache)  # T > 1
        m.step(torch.ones(2, 1, dtype=torch.long), torch.full((2,), 4), cache, rows=torch.tensor([2, 0]))
        m.step(torch.ones(3, 1, dtype=torch.long), torch.full((3,), 5), cache)  # 3 rows > max_rows
        assert runs[0] == 0
        m.step(torch.ones(2, 1, dtype=torch.long), torch.full((2,), 6), cache)
        assert runs[0] == 1
        cpukernels.use_kernel(m, on=False)  # torch's F.linear: the block's modules again
        m.step(torch.ones(2, 1, dtype=torch.long), torch.full((2,), 7), cache)
    assert runs[0] == 1
    cpukernels.use_decode_attention(m, on=False)
    assert m.decode_stack is None
    odd = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=12)).eval()  # head_dim 6
    cpukernels.use_kernel(odd)
    cpukernels.use_decode_attention(odd)  # the attention kernel cannot take it: no stack either
    assert odd.transformer.h[0].attn.decode_attention is None and odd.decode_stack is None
    with torch.inference_mode():
        odd.step(torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), KVCache(odd.config, 1))
    assert runs[0] == 1


def test_decode_blocks_refuses_bad_parameters_and_rows_with_the_reason():
    x, cache, pos = torch.zeros(1, 1, 32), torch.zeros(2, 1, 4, 8, 8), torch.tensor([0])
    with pytest.raises(RuntimeError, match="12 parameters a block .* for 2 blocks, got 23"):
        torch.ops.nanogpt.decode_blocks(x, [torch.ones(32)] * 23, cache, cache.clone(), 0, pos, False)
    with pytest.raises(RuntimeError, match="parameter 14 \\(a weight\\) is None"):
        torch.ops.nanogpt.decode_blocks(x, [torch.ones(32)] * 14 + [None] + [torch.ones(32)] * 9, cache, cache.clone(),
                                        0, pos, False)
    with pytest.raises(RuntimeError, match="rows 1..1 are not all in a cache of 1 rows"):
        torch.ops.nanogpt.decode_blocks(x, [torch.ones(32)] * 24, cache, cache.clone(), 1, pos, False)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_weights_move_into_one_arena_keeping_values_parameters_and_tying(layout):
    model = small_gpt()
    fastpath._set_cpu_linear(model, layout)
    params = {name: (p, p.detach().clone(), p.stride()) for name, p in model.named_parameters()}
    x = torch.randint(0, 97, (1, 5))
    logits = model(x)[0]
    moved = fastpath.pack_in_huge_pages(model)
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
    monkeypatch.delattr(fastpath.mmap, "MADV_HUGEPAGE")
    before = model.lm_head.weight.data_ptr()
    assert fastpath.pack_in_huge_pages(model) == 0 and model.lm_head.weight.data_ptr() == before


def test_a_model_set_up_before_keeps_its_set_up_until_it_changes(monkeypatch):
    """A second engine on the same model neither times the layouts again nor copies the
    weights into a new arena; a model whose weights changed since is set up afresh."""
    model = small_gpt()
    timed = []

    def fake_pass(m, give_up):
        timed.append(candidate_being_timed(m))
        return {"out_in": 1.0, "in_out": 2.0, "kernel": 3.0}[timed[-1]]
    monkeypatch.setattr(fastpath, "_decode_pass_seconds", fake_pass)
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
