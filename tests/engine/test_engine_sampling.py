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


def _mixed_batches(n_vocab: int, trials: int):
    """Random batches mixing greedy, top-k, top-p and whole-vocabulary rows over bfloat16-rounded
    logits (many exact ties, as a half-precision model's logits have)."""
    g = torch.Generator().manual_seed(3)
    choices = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=1),
               SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=0.8, top_k=50),
               SamplingParams(temperature=1.0, top_k=0, top_p=0.5), SamplingParams(temperature=1.0, top_k=0, top_p=0.99),
               SamplingParams(temperature=0.7, top_k=40, top_p=0.8), SamplingParams(temperature=1.0, top_k=0)]
    for _ in range(trials):
        B = int(torch.randint(1, 7, (1,), generator=g))
        params = [choices[int(i)] for i in torch.randint(0, len(choices), (B,), generator=g)]
        scale = [0.5, 3.0, 8.0][int(torch.randint(0, 3, (1,), generator=g))]
        logits = (torch.randn(B, n_vocab, generator=g) * scale).to(torch.bfloat16).float()
        yield logits, params, torch.randint(0, 2**40, (B,), generator=g).tolist(), torch.randint(0, 99, (B,),
                                                                                                generator=g).tolist()


@pytest.mark.slow
def test_the_cpus_shortcuts_pick_the_tokens_of_the_full_race(monkeypatch):
    """On a CPU the sampler races only the top candidates when every kept token is among them,
    and looks for a nucleus among the top 1024 logits first; the tokens are those of the full
    race over the whole vocabulary after a full sort (what a GPU runs), ties and all, and a
    row's token is the same alone."""
    import model.sampling as sampling
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", 64)  # so that some nuclei reach past it
    runs = {"candidates": 0, "full": 0}
    threshold = sampling._truncation_threshold

    def counting(scaled, bp):
        out = threshold(scaled, bp)
        if sampling._syncs_are_free(scaled.device):  # the CPU's own choice, not the full race below
            runs["full" if out[1] is None else "candidates"] += 1
        return out
    monkeypatch.setattr(sampling, "_truncation_threshold", counting)
    for logits, params, seeds, steps in _mixed_batches(2000, 150):
        fast = _sample(logits, params, seeds, steps, 2000)
        with monkeypatch.context() as m:
            m.setattr(sampling, "_syncs_are_free", lambda device: False)
            assert _sample(logits, params, seeds, steps, 2000) == fast
        for b in range(len(params)):
            assert _sample(logits[b:b + 1], params[b:b + 1], seeds[b:b + 1], steps[b:b + 1], 2000) == [fast[b]]
    assert runs["candidates"] > 50 and runs["full"] > 50  # both paths were taken


@pytest.mark.slow
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
