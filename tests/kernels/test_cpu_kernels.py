"""The CPU kernels (model/kernels/cpu.py, model/kernels/csrc/): matrix-vector products, decode
attention, the fused decode blocks and the sampling helpers. The engine's choice of what runs
them is tested in tests/engine/test_cpu_setup.py."""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.kernels import cpu as cpukernels
from model.gpt import GPT, GPTConfig, KVCache
from tiny_gpt import small_gpt

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


@pytest.mark.slow
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


def fused_and_module_steps(model, B, row0, rows=10, steps=4):
    """Logits and caches of `steps` one-token steps of B sequences at cache rows row0.. after an
    8-token prompt, (fused op, block modules): each from its own copy of the model."""
    seq = torch.randint(0, model.config.vocab_size, (B, 8 + steps), generator=torch.Generator().manual_seed(B))
    results = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        cpukernels.use_decode_attention(m)  # before the int8 kernel: the stack holds the modules, which keep
        cpukernels.use_int8_kernel(m)       # their objects when the kernel changes their class
        if not fused:
            m.decode_stack = None
        cache = KVCache(m.config, rows, dtype=m.transformer.wpe.weight.dtype)
        with torch.inference_mode():
            assert not fused or m.decode_stack.applies(B, cache.k)
            m.step(seq[:, :8], torch.zeros(B, dtype=torch.long), cache, row0=row0)
            logits = [m.step(seq[:, i:i + 1], torch.full((B,), i), cache, row0=row0) for i in range(8, 8 + steps)]
        results.append((torch.cat(logits, 1), cache.k, cache.v))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias,gelu", [(True, "tanh"), (False, "none")])
def test_decode_blocks_with_int8_layers_gives_the_bits_of_the_blocks_own_modules(monkeypatch, dtype, bias, gelu):
    """decode_blocks_int8 is KernelInt8Linear's products in Block.step_parts' order: equal to the
    bit to the modules called one by one, in both activation dtypes, for batches of 1, 3 and 8
    (one kernel block), at row 0 and beyond."""
    from model.quant import quantize_model
    runs = fused_steps_counted(monkeypatch)
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=128, bias=bias, gelu_approximate=gelu)
    model = quantize_model(GPT(config).eval(), dtype=dtype)  # n_embd 128: two groups of 64 a row
    assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.int8
    for B, row0 in ((1, 0), (1, 5), (3, 2), (8, 0), (8, 2)):
        fused, modules = fused_and_module_steps(model, B, row0)
        assert all(torch.equal(a, b) for a, b in zip(fused, modules))
        assert fused[1][:, row0:row0 + B].abs().sum() > 0 and fused[1][:, :row0].abs().sum() == 0  # its rows only
    assert runs[0] == 5 * 4  # batches x steps: the int8 op did run


def test_decode_stack_applies_to_int8_layers_only_on_the_kernel(monkeypatch):
    """An int8 model's stack applies once every layer is KernelInt8Linear (installed before or
    after the stack) and B is within their rows; the torch reference (Int8Linear) keeps the modules."""
    from model.quant import quantize_model
    runs = fused_steps_counted(monkeypatch)
    m = quantize_model(small_gpt())
    cpukernels.use_decode_attention(m)
    cache = KVCache(m.config, 3)
    with torch.inference_mode():
        assert not m.decode_stack.applies(1, cache.k)  # Int8Linear: the torch reference
        cpukernels.use_int8_kernel(m, max_rows=2)
        assert m.decode_stack.applies(2, cache.k) and not m.decode_stack.applies(3, cache.k)
        m.step(torch.ones(3, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long), cache)  # 3 rows > max_rows
        assert runs[0] == 0
        m.step(torch.ones(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long), cache)
        assert runs[0] == 1
        cpukernels.use_int8_kernel(m, on=False)
        m.step(torch.ones(2, 1, dtype=torch.long), torch.full((2,), 2), cache)
    assert runs[0] == 1


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


def test_decode_blocks_int8_runs_a_layer_without_scales_on_the_float_kernel():
    """None in scales is a float layer: with every one None, decode_blocks_int8 is decode_blocks."""
    m = small_gpt()
    cpukernels.use_kernel(m)
    cpukernels.use_decode_attention(m)
    x, pos = torch.randn(2, 1, 32), torch.tensor([3, 5])
    outs = []
    for int8_op in (False, True):
        cache = KVCache(m.config, 3)
        args = (cache.k, cache.v, 1, pos, False)
        with torch.inference_mode():
            outs.append((torch.ops.nanogpt.decode_blocks_int8(x, m.decode_stack.params, [None] * 8, *args) if int8_op
                         else torch.ops.nanogpt.decode_blocks(x, m.decode_stack.params, *args), cache.k))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_decode_blocks_int8_refuses_scales_that_do_not_match_the_weights():
    x, cache, pos = torch.zeros(1, 1, 32), torch.zeros(2, 1, 4, 8, 8), torch.tensor([0])
    params = [torch.ones(32)] * 24
    params[2] = torch.ones(96, 32, dtype=torch.int8)  # block 0's c_attn weight
    scales = [torch.ones(96, 1)] + [None] * 7
    op = torch.ops.nanogpt.decode_blocks_int8
    with pytest.raises(RuntimeError, match="decode_blocks_int8: scales must hold 4 a block .* for 2 blocks, got 7"):
        op(x, params, scales[:7], cache, cache.clone(), 0, pos, False)
    with pytest.raises(RuntimeError, match="parameter 2 \\(a weight\\) is int8 but scales\\[0\\] is None"):
        op(x, params, [None] * 8, cache, cache.clone(), 0, pos, False)
    float_given = "parameter 16 \\(a weight\\) is Float, not int8, but scales\\[5\\] is given"  # block 1's c_proj
    with pytest.raises(RuntimeError, match=float_given):
        op(x, params, scales[:5] + [torch.ones(32, 1)] + scales[6:], cache, cache.clone(), 0, pos, False)
    with pytest.raises(RuntimeError, match="decode_blocks_int8: parameter 14 \\(a weight\\) is None"):
        op(x, params[:14] + [None] + params[15:], scales, cache, cache.clone(), 0, pos, False)


