"""The Triton int8 kernel (model/kernels/triton_int8.py) under Triton's interpreter on CPU tensors,
against model/quant.py's torch reference. Skipped where triton does not import."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from model.kernels import triton_int8
from model.quant import dequantize_rows, quantize_rows

pytest.importorskip("triton")

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative to the largest output


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    """tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU, before triton is imported."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("no GPU, and TRITON_INTERPRET is not 1 (set it before triton is imported)")


def device() -> str:
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, shape", [(1, (96, 128)), (3, (130, 192)), (17, (64, 64)), (5, (40, 37))], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_products_match_the_dequantized_reference(dtype, rows, shape, with_bias):
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize_rows(torch.randn(*shape, generator=g))
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype) if with_bias else None
    d = device()
    got = triton_int8.int8_linear(x.to(d), q.to(d), scale.to(d), None if bias is None else bias.to(d)).cpu()
    assert got.dtype == dtype and got.shape == (rows, shape[0])
    want = F.linear(x.float(), dequantize_rows(q, scale, dtype).float(), None if bias is None else bias.float())
    assert (got.float() - want).abs().max() / want.abs().max() < TOL[dtype]


def test_leading_dimensions_are_kept():
    q, scale = quantize_rows(torch.randn(64, 128))
    x = torch.randn(2, 3, 128)
    got = triton_int8.int8_linear(x, q, scale)
    assert got.shape == (2, 3, 64)
    assert torch.allclose(got, F.linear(x, dequantize_rows(q, scale)), rtol=1e-4, atol=1e-4)


def test_a_layout_it_does_not_take_is_refused_by_name():
    q = torch.zeros(8, 96, dtype=torch.int8)
    with pytest.raises(ValueError, match="groups of 32 inputs"):
        triton_int8.int8_linear(torch.randn(1, 96), q, torch.ones(8, 3))
    with pytest.raises(ValueError, match="do not match"):
        triton_int8.int8_linear(torch.randn(1, 95), q, torch.ones(8, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 8, 32, 64])
@pytest.mark.parametrize("shape", [(2304, 768), (768, 3072), (50304, 768)], ids=str)
def test_gpt2_shapes_on_cuda_through_the_layer(rows, shape):
    """bench/gpu_check.sh: Int8Linear with use_triton at GPT-2 124M's shapes and a decode step's rows,
    in bfloat16 on the GPU, against the dequantized float32 reference."""
    from model.quant import Int8Linear
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize_rows(torch.randn(*shape, generator=g) * 0.02)
    layer = Int8Linear(q, scale, torch.randn(shape[0], generator=g).bfloat16()).cuda()  # scales stay float32
    layer.use_triton = True
    x = torch.randn(rows, shape[1], generator=g).bfloat16().cuda()
    assert triton_int8.applies(x)
    got = layer(x)
    want = F.linear(x.float(), dequantize_rows(layer.weight, layer.weight_scale), layer.bias.float())
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() / want.abs().max() < TOL[torch.bfloat16]
