import pytest
import torch

from engine_helpers import one_thread  # noqa: F401 (autouse fixture)
from model.sampling import BatchParams, SamplingParams, gumbel_noise, sample


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("temperature", -0.1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
    ("seed", -1), ("stop", ("",)),
])
def test_validate_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def _sample(logits, params, seeds, steps, n_vocab):
    bp = BatchParams.build(params, seeds, logits.device)
    return sample(logits, bp, torch.tensor(steps), n_vocab).tolist()


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    out = _sample(logits, [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(temperature=0.0)],
                  [1, 2, 3], [0, 0, 0], 50)
    assert out == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=0),
    SamplingParams(temperature=1.0, top_k=60), SamplingParams(temperature=2.0, top_k=0, top_p=0.9),
])
def test_padded_vocab_is_never_sampled(params):
    logits = torch.zeros(1, 64)
    logits[0, 50:] = 100.0  # the padding rows are by far the likeliest
    for seed in range(200):
        (token,) = _sample(logits, [params], [seed], [0], 50)
        assert token < 50


def test_seeded_row_is_the_same_alone_or_in_any_batch():
    torch.manual_seed(1)
    logits = torch.randn(5, 100) * 3
    mine = SamplingParams(temperature=0.9, top_k=20, top_p=0.8)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=0),
              SamplingParams(temperature=0.5, top_k=0, top_p=0.5), SamplingParams(top_k=80)]
    for seed in range(50):
        for step in (0, 7):
            alone = _sample(logits[2:3], [mine], [seed], [step], 100)[0]
            batch = _sample(logits, others[:2] + [mine] + others[2:], [5, 6, seed, 7, 8], [1, 2, step, 3, 4], 100)
            assert batch[2] == alone


def test_top_k_and_top_p_restrict_the_candidates():
    torch.manual_seed(2)
    logits = torch.randn(1, 100) * 2
    top5 = set(logits[0].topk(5).indices.tolist())
    for seed in range(300):
        assert _sample(logits, [SamplingParams(temperature=5.0, top_k=5)], [seed], [0], 100)[0] in top5
    peaked = torch.tensor([[5.0, 0.0, 0.0, 0.0]])  # p(0) ~ 0.98
    for seed in range(300):
        assert _sample(peaked, [SamplingParams(temperature=1.0, top_k=0, top_p=0.5)], [seed], [0], 4)[0] == 0


def test_samples_follow_the_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 4000  # one batch of n rows, each with its own seed
    tokens = _sample(logits.expand(n, -1), [SamplingParams(temperature=1.0, top_k=0)] * n, range(n), [3] * n, 4)
    counts = torch.bincount(torch.tensor(tokens), minlength=4).float()
    assert torch.allclose(counts / n, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_noise_depends_on_seed_step_and_token_only():
    ids = torch.arange(1000)
    a = gumbel_noise(torch.tensor([3]), torch.tensor([4]), ids.unsqueeze(0))
    b = gumbel_noise(torch.tensor([9, 3]), torch.tensor([4, 4]), ids[500:].unsqueeze(0).expand(2, -1))
    assert torch.equal(a[0, 500:], b[1])
    assert not torch.equal(a[0, 500:], b[0])
    assert torch.isfinite(a).all()
