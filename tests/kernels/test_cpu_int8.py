"""The CPU kernel's int8 products (model/kernels/cpu.py's linear_rows_int8, csrc/matvec_int8_rows.inc)
against model/quant.py's torch reference: int8 rows with their group scales, widened in registers."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from model.kernels import cpu as cpukernels
from model.quant import Int8Linear, KernelInt8Linear, dequantize_rows, quantize_rows

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the kernel is x86-64 (AVX2) only")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative to the largest output


@pytest.fixture(scope="module", autouse=True)
def kernel():
    cpukernels.load()


@pytest.fixture(params=["native", "avx512", "avx2"])
def isa(request, monkeypatch):
    """The CPU's own vector instructions (AVX-512, with VNNI where it has them), AVX-512 without
    VNNI (the same as native on a CPU without it) and AVX2."""
    if request.param == "native":
        monkeypatch.delenv("NANOGPT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("NANOGPT_CPU_ISA", request.param)
    return request.param


def quantized(n_out: int, n_in: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_rows(torch.randn(n_out, n_in, generator=g))
    return q, scale, torch.randn(n_out, generator=g)


def reference(x, q, scale, b):
    """float32 math on the dequantized weights and the same (rounded) x and bias."""
    return F.linear(x.float(), dequantize_rows(q, scale), None if b is None else b.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 13, 24])  # 13, 24: several blocks of 8
# 1031 x 128: two groups a row, two threads' shares with rows left over; 96 x 768: GPT-2's width;
# 50 x 37: one group a row (64 does not divide 37) and a tail that no vector width divides
@pytest.mark.parametrize("shape", [(1031, 128), (96, 768), (50, 37)], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_products_match_the_dequantized_reference(isa, dtype, rows, shape, with_bias):
    q, scale, b = quantized(*shape)
    assert scale.shape[1] == (shape[1] // 64 if shape[1] % 64 == 0 else 1)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
    bias = b.to(dtype) if with_bias else None
    got = cpukernels.linear_rows_int8(x, q, scale, bias)
    assert got.dtype == dtype and got.shape == (rows, shape[0])
    want = reference(x, q, scale, bias)
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(isa, dtype):
    q, scale, b = quantized(200, 256)
    x = torch.randn(40, 256).to(dtype)  # half precision: tiles of 16 (or 8) rows, and 8 rows left over
    together = cpukernels.linear_rows_int8(x, q, scale, b.to(dtype))
    for i in (0, 7, 12, 20, 39):
        alone = cpukernels.linear_rows_int8(x[i:i + 1], q, scale, b.to(dtype))
        assert torch.equal(alone[0], together[i])


def test_leading_dimensions_are_kept():
    q, scale, b = quantized(64, 128)
    x = torch.randn(2, 3, 128)
    got = cpukernels.linear_rows_int8(x, q, scale, b)
    assert got.shape == (2, 3, 64)
    assert torch.allclose(got, reference(x, q, scale, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (lambda q, s, x: (x, q.float(), s, None), "contiguous int8"),
    (lambda q, s, x: (x, q, s.half(), None), "scale must be a contiguous float32"),
    (lambda q, s, x: (x, q, s[:, :1].repeat(1, 3), None), "groups dividing 128"),
    (lambda q, s, x: (x[:, :64], q, s, None), "last dimension must be 128"),
    (lambda q, s, x: (x.long(), q, s, None), "float32, float16 or bfloat16"),
    (lambda q, s, x: (x, q, s, torch.zeros(64, dtype=torch.float16)), "bias must be a contiguous vector of 64"),
])
def test_bad_arguments_are_refused_with_the_reason(bad, message):
    q, scale, _ = quantized(64, 128)
    with pytest.raises(RuntimeError, match=message):
        cpukernels.linear_rows_int8(*bad(q, scale, torch.randn(2, 128)))


def test_kernel_layer_routes_small_calls_to_the_kernel_and_big_ones_to_the_reference(monkeypatch):
    q, scale, b = quantized(64, 128)
    layer = Int8Linear(q, scale, b)
    layer.__class__ = KernelInt8Linear
    layer.kernel_max_rows = 4
    calls, op = [], torch.ops.nanogpt.linear_rows_int8
    monkeypatch.setattr(torch.ops.nanogpt, "linear_rows_int8", lambda *a: calls.append(a[0].shape) or op(*a))
    with torch.no_grad():
        small, big = layer(torch.randn(1, 4, 128)), layer(torch.randn(1, 5, 128))
    assert calls == [torch.Size([1, 4, 128])]
    assert small.shape == (1, 4, 64) and big.shape == (1, 5, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 9, 13, 17, 24, 32, 40])
def test_every_isa_gives_the_same_bits_for_half_precision_x(monkeypatch, dtype, rows):
    """Half-precision x takes the int16 products, whose group sums are exact integers: AVX-512 with
    VNNI (vpdpwssd), without it (vpmaddwd + vpaddd) and AVX2, and both of the kernel's layouts (a
    few rows along the inputs, rows 16 or 8 at a time across x), give the same outputs. So a
    model's numbers depend neither on the CPU that serves it nor on the batch: 9-40 rows take
    tiles of rows on AVX-512 and AVX2, with the rows left over along the inputs."""
    q, scale, bias = quantized(1031, 768)
    x = torch.randn(rows, 768).to(dtype)
    outputs = {}
    for isa in ("native", "avx512", "avx2"):
        if isa == "native":
            monkeypatch.delenv("NANOGPT_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("NANOGPT_CPU_ISA", isa)
        outputs[isa] = torch.ops.nanogpt.linear_rows_int8(x, q, scale, bias.to(dtype))
    assert torch.equal(outputs["native"], outputs["avx512"])
    assert torch.equal(outputs["native"], outputs["avx2"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_row_that_is_not_finite_gives_nan_and_leaves_the_others_alone(isa, dtype):
    """Half-precision x is rounded to int16 a row at a time (its scale from its largest |x|): a row
    holding inf or NaN has no such scale, and gives NaN outputs, without touching the other rows."""
    q, scale, b = quantized(96, 128)
    x = torch.randn(3, 128).to(dtype)
    alone = cpukernels.linear_rows_int8(x[2:], q, scale, b.to(dtype))
    for bad in (float("inf"), float("nan")):
        x[1, 5] = bad
        got = cpukernels.linear_rows_int8(x, q, scale, b.to(dtype))
        assert got[1].isnan().all() and not got[[0, 2]].isnan().any()
        assert torch.equal(got[2:], alone)
    zeros = cpukernels.linear_rows_int8(torch.zeros(1, 128, dtype=dtype), q, scale, b.to(dtype))
    assert torch.equal(zeros[0], b.to(dtype))  # a row of zeros: the bias alone
