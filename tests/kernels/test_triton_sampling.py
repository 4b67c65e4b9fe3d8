"""model/kernels/triton_sampling.py against model/sampling.sample (today's sampler) for the same
seeds and steps, under Triton's interpreter (tests/conftest.py), at a small vocabulary."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from model.kernels import cpu as cpukernels  # noqa: E402
from model.kernels import triton_decode, triton_sampling  # noqa: E402
from model.sampling import BatchParams, SamplingParams, sample  # noqa: E402


@pytest.fixture(autouse=True)
def device_or_interpreter(monkeypatch):
    if not (torch.cuda.is_available() or triton_decode.interpreting()):
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set: Triton cannot run these kernels")
    monkeypatch.setattr(cpukernels, "_loaded", False)  # the sampler's tensor path, which a GPU runs


ROWS = [SamplingParams(temperature=0.8, top_k=50, seed=1), SamplingParams(temperature=0.0, seed=2),
        SamplingParams(temperature=1.0, top_k=0, seed=3), SamplingParams(temperature=0.7, top_k=5, seed=4),
        SamplingParams(temperature=1.3, top_k=1, seed=5), SamplingParams(temperature=0.5, top_k=300, seed=6),
        SamplingParams(temperature=2.0, top_k=2, seed=2**40 + 7)]


def draws(params, logits, steps, n_vocab, block_v):
    """(today's tokens, the kernel's) for rows `params` at each of `steps`, stacked (S, B)."""
    bp = BatchParams.build(params, [p.seed for p in params], torch.device("cpu"))
    assert triton_sampling.supports(bp)
    want, got = [], []
    for s in steps:
        step = torch.full((len(params),), s, dtype=torch.long)
        want.append(sample(logits, bp, step, n_vocab))
        got.append(triton_sampling.sample(logits, bp.temperature, bp.top_k, bp.seed, step, n_vocab, block_v=block_v))
    return torch.stack(want), torch.stack(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sampling_draws_todays_tokens_for_the_same_seeds_and_steps(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(len(ROWS), 100) * 3).to(dtype)  # a padded vocabulary: 96 of 100 are tokens
    want, got = draws(ROWS, logits, [0, 5], 96, block_v=128)
    assert torch.equal(got, want), (got, want)
    assert got[:, 1].unique().tolist() == [logits[1, :96].float().argmax().item()]  # the greedy row


def test_ties_and_thresholds_across_tiles():
    torch.manual_seed(1)
    rows = [SamplingParams(temperature=0.0, seed=1), SamplingParams(temperature=0.9, top_k=6, seed=2)]
    logits = torch.randn(2, 40)
    logits[0, 21] = logits[0, 37] = 9.0  # the first largest is in the second of three tiles of 16
    logits[1, [0, 1, 2, 4, 5]] = 6.0
    logits[1, [3, 19, 35]] = 4.0  # the 6th largest, tied across tiles: all three are kept
    want, got = draws(rows, logits, [0, 1, 2], 40, block_v=16)
    assert torch.equal(got, want), (got, want)
    assert got[:, 0].tolist() == [21, 21, 21]


def test_top_p_rows_are_left_to_todays_sampler():
    bp = BatchParams.build([SamplingParams(top_p=0.9), SamplingParams()], [1, 2], torch.device("cpu"))
    assert not triton_sampling.supports(bp)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_sampling_at_gpt2_vocabulary_draws_the_gpu_samplers_tokens():
    torch.manual_seed(2)
    params = [ROWS[i % len(ROWS)] for i in range(32)]
    bp = BatchParams.build(params, list(range(32)), torch.device("cuda"))
    logits = (torch.randn(32, 50304, device="cuda") * 2).to(torch.bfloat16)
    for s in range(4):
        step = torch.full((32,), s, dtype=torch.long, device="cuda")
        want = sample(logits, bp, step, 50257)
        got = triton_sampling.sample(logits, bp.temperature, bp.top_k, bp.seed, step, 50257)
        assert torch.equal(got, want)
