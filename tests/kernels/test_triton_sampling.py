"""model/kernels/triton_sampling.py against model/sampling.sample (today's sampler) for the same
seeds and steps, under Triton's interpreter (tests/conftest.py), at a small vocabulary."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from model.kernels import cpu as cpukernels  # noqa: E402
from model.kernels import triton_decode, triton_sampling  # noqa: E402
from model.sampling import BatchParams, SamplingParams, _truncation_threshold, sample  # noqa: E402


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
    want, got = [], []
    for s in steps:
        step = torch.full((len(params),), s, dtype=torch.long)
        want.append(sample(logits, bp, step, n_vocab))
        got.append(triton_sampling.sample(logits, bp.temperature, bp.top_k, bp.top_p, bp.seed, step, n_vocab,
                                          block_v=block_v))
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


EPS = 1e-5  # how near top_p a token's exact mass above it may be for the kernel and sample() to differ


def ambiguous(logits, bp, n_vocab, eps=EPS):
    """(B, n_vocab) bool: the tokens of a top-p row's top-k set (or whole row) whose exact
    (float64) probability mass above them, over that set, lies within eps of the row's top_p."""
    scaled = (logits[:, :n_vocab].float() / bp.temperature.clamp_min(1e-6).unsqueeze(1)).double()
    out = torch.zeros(scaled.shape, dtype=torch.bool)
    for r in range(scaled.shape[0]):
        p, k = bp.top_p[r].item(), bp.top_k[r].item()
        if bp.greedy[r] or p >= 1.0:
            continue
        vals = scaled[r].sort(descending=True).values[:k or n_vocab]
        probs = torch.softmax(vals, dim=0)
        before = probs.cumsum(0) - probs  # float64: exact enough to judge a float32 rounding
        first = torch.searchsorted(-vals, -scaled[r]).clamp_max(len(vals) - 1)  # a value's first rank
        above = before[first]
        out[r] = ((above - p).abs() <= eps) & (scaled[r] >= vals[-1])  # top-k's cut is exact on both sides
    return out


def kept_sets(logits, bp, n_vocab, block_v):
    """(today's kept tokens, the kernel's) as (B, n_vocab) bool, sampling rows only, and the
    kernel's tokens at step 0."""
    scaled = logits[:, :n_vocab].float() / bp.temperature.clamp_min(1e-6).unsqueeze(1)
    want, _ = _truncation_threshold(scaled, bp)
    thr = torch.empty(logits.shape[0])
    step = torch.zeros(logits.shape[0], dtype=torch.long)
    got = triton_sampling.sample(logits, bp.temperature, bp.top_k, bp.top_p, bp.seed, step, n_vocab,
                                 block_v=block_v, threshold=thr)
    sampling = ~bp.greedy.unsqueeze(1)
    return (scaled >= want) & sampling, (scaled >= thr.unsqueeze(1)) & sampling, got


NUCLEUS = [SamplingParams(temperature=1.0, top_k=0, top_p=0.9, seed=1),
           SamplingParams(temperature=0.7, top_k=0, top_p=0.5, seed=2),
           SamplingParams(temperature=1.5, top_k=0, top_p=0.2, seed=3),
           SamplingParams(temperature=1.0, top_k=8, top_p=0.8, seed=4),  # top-k and top-p together
           SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=5),
           SamplingParams(temperature=1.2, top_k=3, top_p=0.999, seed=6)]  # top-k binds first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_p_keeps_todays_set_but_within_rounding_of_the_boundary(dtype):
    torch.manual_seed(3)
    logits = (torch.randn(len(NUCLEUS), 48) * 2).to(dtype)  # bfloat16: ties, also at top-k's k-th value
    bp = BatchParams.build(NUCLEUS, [p.seed for p in NUCLEUS], torch.device("cpu"))
    want, got, tokens = kept_sets(logits, bp, 40, block_v=32)
    near = ambiguous(logits, bp, 40)
    assert not ((want ^ got) & ~near).any(), (want ^ got).nonzero()
    clear = ~near.any(dim=1)
    assert clear.sum() >= len(NUCLEUS) - 1, near.nonzero()  # random rows are almost never near it
    assert torch.equal(want[clear], got[clear])
    step = torch.zeros(len(NUCLEUS), dtype=torch.long)
    assert torch.equal(tokens[clear], sample(logits, bp, step, 40)[clear])
    assert 1 < got[0].sum() < 40 and got[3].sum() <= 8 and got[5].sum() == 3  # the cuts are real


def test_top_p_keeps_ties_with_its_threshold_and_a_top_p_just_below_one_keeps_the_row():
    rows = [SamplingParams(temperature=1.0, top_k=0, top_p=0.6, seed=1),
            SamplingParams(temperature=1.0, top_k=0, top_p=float.fromhex("0x1.fffffep-1"), seed=2),
            SamplingParams(temperature=1.0, top_k=3, top_p=float.fromhex("0x1.fffffep-1"), seed=3)]
    logits = torch.full((3, 24), -3.0)
    logits[0, [2, 9, 17, 20]] = 2.0  # four tied tokens hold most of the mass; top_p is reached inside them
    logits[1] = torch.linspace(1.0, -1.0, 24)  # the largest float below 1: nearly the whole row
    # the top-k set's float32 mass rounds to 0.9999999, below top_p: still no more than its k tokens
    logits[2, [4, 11, 15]] = torch.tensor([1.87, -1.32, -2.64])
    logits[2, [0, 1]] = -2.7
    bp = BatchParams.build(rows, [1, 2, 3], torch.device("cpu"))
    want, got, _ = kept_sets(logits, bp, 24, block_v=16)
    assert got[0].nonzero().flatten().tolist() == [2, 9, 17, 20] and torch.equal(want[0], got[0])
    assert got[1].all() and torch.equal(want[1], got[1]) and not ambiguous(logits, bp, 24).any()
    assert got[2].nonzero().flatten().tolist() == [4, 11, 15] and torch.equal(want[2], got[2])


def test_mixed_batch_with_top_p_draws_todays_tokens():
    rows = [SamplingParams(temperature=0.8, top_k=0, top_p=0.9, seed=1),
            SamplingParams(temperature=0.0, top_p=0.5, seed=2),  # greedy: top_p has no say
            SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=3),  # top_p 1: everything kept
            SamplingParams(temperature=0.7, top_k=5, top_p=0.6, seed=4),
            SamplingParams(temperature=1.3, top_k=1, top_p=0.3, seed=5),  # top_k 1: greedy
            SamplingParams(temperature=0.9, top_k=6, seed=6)]
    torch.manual_seed(4)
    logits = (torch.randn(len(rows), 40) * 2).to(torch.bfloat16)
    bp = BatchParams.build(rows, [p.seed for p in rows], torch.device("cpu"))
    assert not ambiguous(logits, bp, 36).any()
    want, got = draws(rows, logits, [0, 7], 36, block_v=64)
    assert torch.equal(got, want), (got, want)
    best = logits[:, :36].float().argmax(dim=1)
    assert got[:, 1].tolist() == [best[1]] * 2 and got[:, 4].tolist() == [best[4]] * 2


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
        got = triton_sampling.sample(logits, bp.temperature, bp.top_k, bp.top_p, bp.seed, step, 50257)
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_top_p_at_gpt2_vocabulary_keeps_the_gpu_samplers_set_but_at_the_boundary():
    torch.manual_seed(5)
    params = [NUCLEUS[i % len(NUCLEUS)] for i in range(16)]
    bp = BatchParams.build(params, list(range(16)), torch.device("cuda"))
    logits = (torch.randn(16, 50304, device="cuda") * 2).to(torch.bfloat16)
    scaled = logits[:, :50257].float() / bp.temperature.unsqueeze(1)
    want_thr, _ = _truncation_threshold(scaled, bp)
    thr = torch.empty(16, device="cuda")
    step = torch.zeros(16, dtype=torch.long, device="cuda")
    tokens = triton_sampling.sample(logits, bp.temperature, bp.top_k, bp.top_p, bp.seed, step, 50257, threshold=thr)
    want, got = scaled >= want_thr, scaled >= thr.unsqueeze(1)
    near = ambiguous(logits.cpu(), BatchParams.build(params, list(range(16)), torch.device("cpu")), 50257, eps=1e-4)
    assert not ((want ^ got).cpu() & ~near).any()
    clear = ~near.any(dim=1).cuda()
    assert torch.equal(tokens[clear], sample(logits, bp, step, 50257)[clear])
