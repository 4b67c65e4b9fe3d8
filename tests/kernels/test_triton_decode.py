"""model/kernels/triton_decode.py's kernels against torch's operators, under Triton's
interpreter (TRITON_INTERPRET=1: CPU tensors), at small shapes; bench/gpu_check.sh runs the
same checks on CUDA at GPT-2 124M's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from model.gpt import GPT, GPTConfig, KVCache  # noqa: E402
from model.kernels import triton_decode as td  # noqa: E402

def gpu(test):
    """A CUDA test at real shapes (bench/gpu_check.sh runs them; skipped elsewhere)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def device_or_interpreter():
    # tests/conftest.py turns the interpreter on where there is no GPU (before triton's import)
    if not (torch.cuda.is_available() or td.interpreting()):
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set: Triton cannot run these kernels")


def reference_attention(q, k, v, k_cache, v_cache, pos, rows):
    """torch's decode: index_put_ the new key/value, SDPA over each row's positions 0..pos."""
    B, nh, hs = q.shape
    r = torch.arange(B, device=q.device) if rows is None else rows
    k_cache[r, :, pos] = k.to(k_cache.dtype)
    v_cache[r, :, pos] = v.to(v_cache.dtype)
    out = []
    for b in range(B):
        keys, values = k_cache[r[b], :, :pos[b] + 1], v_cache[r[b], :, :pos[b] + 1]  # (nh, L, hs)
        y = F.scaled_dot_product_attention(q[b].unsqueeze(1).float(), keys.float(), values.float())
        out.append(y.squeeze(1).to(q.dtype))
    return torch.stack(out)


def check_attention(device, dtype, B, nh, hs, S, R, pos, rows):
    torch.manual_seed(0)
    qkv = torch.randn(B, 3, nh, hs, device=device).to(dtype)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # strided views, as the model's heads are
    k_cache = torch.randn(R, nh, S, hs, device=device).to(dtype)
    v_cache = torch.randn(R, nh, S, hs, device=device).to(dtype)
    r = torch.arange(B) if rows is None else rows.cpu()
    for b in range(B):  # padding past each row's position: reading any of it poisons the output
        k_cache[r[b], :, pos[b] + 1:] = float("nan")
        v_cache[r[b], :, pos[b] + 1:] = float("nan")
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = reference_attention(q, k, v, want_k, want_v, pos, rows)
    got = td.attention(q, k, v, k_cache, v_cache, pos, rows)
    assert torch.equal(k_cache.nan_to_num(7.0), want_k.nan_to_num(7.0))  # written where torch writes, bit-equal
    assert torch.equal(v_cache.nan_to_num(7.0), want_v.nan_to_num(7.0))
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hs,use_rows", [(16, False), (12, True)])
def test_attention_writes_the_cache_bit_equal_and_attends_over_each_rows_own_length(dtype, hs, use_rows):
    pos = torch.tensor([0, 70, 159])  # lengths 1, 71, 160: one, two and three key blocks
    check_attention("cpu", dtype, 3, 2, hs, 160, 5, pos, torch.tensor([4, 0, 2]) if use_rows else None)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 8, 32])
def test_cuda_attention_at_gpt2_124m_shapes(dtype, B):
    """12 heads of 64, a 1024-long cache; rows from the first position to the last, most past 128."""
    pos = torch.cat([torch.tensor([0, 1023]), torch.randint(129, 1023, (B,), generator=torch.Generator().manual_seed(B))])[:B]
    check_attention("cuda", dtype, B, 12, 64, 1024, 32, pos.cuda(), None)


def reference_linear(x, w, b, ln=None, gelu=None, residual=None):
    """torch's operators in a block's order, each rounded to x's dtype as the model's are."""
    if ln is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], 1e-5)
    y = F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    if gelu is not None:
        y = F.gelu(y.float(), approximate=gelu).to(x.dtype)
    if residual is not None:
        y = (residual.float() + y.float()).to(x.dtype)
    return y


def check_linear(device, dtype, M, K, N, fusion):
    torch.manual_seed(1)
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    b = None if fusion == "ln_nobias" else torch.randn(N, device=device).to(dtype)
    ln = (torch.randn(K, device=device).to(dtype), None if fusion == "ln_nobias" else torch.randn(K, device=device).to(dtype))
    kw = dict(ln=ln if fusion.startswith("ln") else None,
              gelu={"ln_gelu": "none", "ln_gelu_tanh": "tanh"}.get(fusion),
              residual=torch.randn(M, N, device=device).to(dtype) if fusion == "residual" else None)
    got = td.linear(x, w, b, **kw)
    want = reference_linear(x, w, b, **kw)
    assert got.shape == (M, N) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])


FUSIONS = ["plain", "ln", "ln_gelu", "ln_gelu_tanh", "residual", "ln_nobias"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_linear_with_its_fused_norm_gelu_and_residual_matches_torch(dtype, fusion):
    check_linear("cpu", dtype, 17, 80, 40, fusion)  # rows past one program's 16, K and N past and between blocks


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 8, 32])
@pytest.mark.parametrize("K,N,fusion", [(768, 2304, "ln"), (768, 768, "residual"), (768, 3072, "ln_gelu_tanh"),
                                        (768, 3072, "ln_gelu"), (3072, 768, "residual")])
def test_cuda_linear_at_gpt2_124m_shapes(dtype, M, K, N, fusion):
    check_linear("cuda", dtype, M, K, N, fusion)


@pytest.mark.parametrize("gelu", ["none", "tanh"])
def test_model_decode_through_the_triton_path_matches_the_torch_path(gelu):
    torch.manual_seed(2)
    model = GPT(GPTConfig(block_size=96, vocab_size=40, n_layer=2, n_head=2, n_embd=32,
                          gelu_approximate=gelu)).eval()
    B = 3
    pos = torch.tensor([3, 40, 70])  # rows at different lengths in one batch
    idx = torch.randint(0, 40, (B, 1))
    with torch.inference_mode():
        cache = KVCache(model.config, B + 1, torch.device("cpu"), torch.float32)
        prompt = torch.randint(0, 40, (B, 71))
        model.step(prompt, torch.zeros(B, dtype=torch.long), cache, row0=1)  # rows 1..3: their prompts
        torch_cache = KVCache(model.config, B + 1, torch.device("cpu"), torch.float32)
        torch_cache.k.copy_(cache.k), torch_cache.v.copy_(cache.v)
        want = model.step(idx, pos, torch_cache, row0=1, kv_len=96)
        td.use_triton_decode(model, devices=("cpu",))
        assert model.decode_stack.applies(B, cache.k)
        got = model.step(idx, pos, cache, row0=1, kv_len=96)
        td.use_triton_decode(model, on=False)
    assert model.decode_stack is None and model.transformer.h[0].attn.decode_attention is None
    # the new keys and values come from the fused LN+c_attn (another summation order): close, and
    # written where torch writes them (nothing else in the cache moved)
    torch.testing.assert_close(cache.k, torch_cache.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v, torch_cache.v, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.k != torch_cache.k, (cache.k != torch_cache.k) & written(pos, 1, cache.k.shape))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def written(pos, row0, shape):
    """(n_layer, R, nh, S, hs) bool: the positions a decode at pos writes, rows row0.."""
    out = torch.zeros(shape, dtype=torch.bool)
    for b, p in enumerate(pos.tolist()):
        out[:, row0 + b, :, p] = True
    return out


def test_the_attention_hook_takes_one_token_steps_on_its_devices_only():
    hook = td.DecodeAttention(devices=("cuda",))
    q = torch.zeros(1, 2, 1, 16)
    cache = torch.zeros(1, 2, 8, 16)
    assert hook(q, q, q, cache, cache, None, torch.zeros(1, dtype=torch.long)) is None  # a CPU cache
    two = torch.zeros(1, 2, 2, 16)
    assert td.DecodeAttention(devices=("cpu",))(two, two, two, cache, cache, None, torch.zeros(1, dtype=torch.long)) is None


@gpu
@pytest.mark.parametrize("B", [1, 8, 32])
def test_cuda_gpt2_124m_decode_through_the_triton_path_matches_the_torch_path(B):
    torch.manual_seed(3)
    model = GPT(GPTConfig(gelu_approximate="tanh")).eval().to("cuda", torch.bfloat16)  # GPT-2 124M's shapes
    pos = torch.randint(129, 1000, (B,), device="cuda")  # rows at different lengths, past 128
    idx = torch.randint(0, 50257, (B, 1), device="cuda")
    with torch.inference_mode():
        cache = KVCache(model.config, B, torch.device("cuda"), torch.bfloat16)
        cache.k.normal_(), cache.v.normal_()
        torch_cache = KVCache(model.config, B, torch.device("cuda"), torch.bfloat16)
        torch_cache.k.copy_(cache.k), torch_cache.v.copy_(cache.v)
        want = model.step(idx, pos, torch_cache, kv_len=1024).float()
        td.use_triton_decode(model)
        got = model.step(idx, pos, cache, kv_len=1024).float()
        td.use_triton_decode(model, on=False)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
