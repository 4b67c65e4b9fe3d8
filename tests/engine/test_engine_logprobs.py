"""Engine logprobs: equal to a full forward's log-softmax, the same batched as alone, and only
computed for the requests that ask."""

import asyncio
import contextlib

import torch

from engine_helpers import one_thread, tiny_model  # noqa: F401 (autouse fixture)
from model.engine import Engine, EngineConfig
from model.logprobs import prompt_logprobs, token_logprobs
from model.sampling import SamplingParams

DEADLINE = 30.0


@contextlib.asynccontextmanager
async def running_engine(model, **config):
    engine = Engine(model, EngineConfig(**{"max_batch": 4, "cuda_graphs": False, "cpu_attention": "torch",
                                           "cpu_linear": "out_in", **config}))
    await engine.start()
    try:
        yield engine
    finally:
        await asyncio.wait_for(engine.stop(drain=False), DEADLINE)


def reference(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of nanoGPT's full forward at every position: (T, n_vocab)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0, :, :model.tokenizer.n_vocab].float(), dim=-1)


async def test_prompt_and_sampled_logprobs_equal_the_full_forward():
    model = tiny_model(block_size=64)
    prompt = model.tokenizer.encode("the quick brown fox jumps")
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=5, seed=3, logprobs=3, prompt_logprobs=2)
    async with running_engine(model, prefill_chunk=4, idle_prefill_chunk=7) as engine:  # several chunks
        r = await asyncio.wait_for(engine.submit(prompt, params).result(), DEADLINE)
    ids = prompt + r.token_ids
    ref = reference(model, ids)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(prompt)
    for p, entry in enumerate(r.prompt_logprobs[1:], start=1):
        assert entry.token == prompt[p]
        assert abs(entry.logprob - ref[p - 1, prompt[p]].item()) < 1e-4
        assert [t for t, _ in entry.top] == ref[p - 1].topk(2).indices.tolist()
    assert [e.token for e in r.logprobs] == r.token_ids
    for k, entry in enumerate(r.logprobs):
        row = ref[len(prompt) - 1 + k]  # raw logits: temperature and top_k do not enter
        assert abs(entry.logprob - row[entry.token].item()) < 1e-4
        assert len(entry.top) == 3 and abs(entry.top[0][1] - row.max().item()) < 1e-4


async def test_logprobs_of_a_batched_request_equal_it_alone():
    model = tiny_model(block_size=64)
    tok = model.tokenizer
    params = SamplingParams(max_new_tokens=5, temperature=0.0, logprobs=2, prompt_logprobs=2)
    prompt = tok.encode("a batched request")
    async with running_engine(model) as engine:
        alone = await asyncio.wait_for(engine.submit(prompt, params).result(), DEADLINE)
        others = [engine.submit(tok.encode(t), SamplingParams(max_new_tokens=8, temperature=1.0, seed=i))
                  for i, t in enumerate(["some neighbour", "x", "another one beside it"])]
        batched = engine.submit(prompt, params)
        results = await asyncio.wait_for(asyncio.gather(batched.result(), *(h.result() for h in others)), DEADLINE)
    together = results[0]
    assert together.token_ids == alone.token_ids
    pairs = list(zip(alone.prompt_logprobs[1:] + alone.logprobs, together.prompt_logprobs[1:] + together.logprobs))
    for a, b in pairs:
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-5
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert all(r.logprobs is None and r.prompt_logprobs is None for r in results[1:])  # nobody else pays


async def test_requests_without_logprobs_get_no_hidden_states():
    """Prompt chunks of requests that do not score run as before: no output layer over them."""
    model = tiny_model(block_size=64)
    seen, step_parts = [], model.step_parts

    def spy(parts, cache):
        seen.extend(p.logits for p in parts)
        return step_parts(parts, cache)

    model.step_parts = spy
    async with running_engine(model) as engine:
        await asyncio.wait_for(engine.submit(model.tokenizer.encode("plain prompt here"),
                                             SamplingParams(max_new_tokens=2)).result(), DEADLINE)
        assert "hidden" not in seen
        await asyncio.wait_for(engine.submit(model.tokenizer.encode("scored prompt here"),
                                             SamplingParams(max_new_tokens=2, prompt_logprobs=0)).result(), DEADLINE)
        assert "hidden" in seen


def test_prompt_logprobs_in_pieces_equal_one_product():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden, targets = torch.randn(11, 8), torch.randint(0, 40, (11,))
    with torch.no_grad():
        pieces = prompt_logprobs(hidden, head, targets, 3, 40, chunk=4)
        whole = token_logprobs(head(hidden), targets, 3, 40)
    assert [(e.token, round(e.logprob, 5)) for e in pieces] == [(e.token, round(e.logprob, 5)) for e in whole]
    assert all(t < 40 for e in pieces for t, _ in e.top)  # padded vocabulary entries never appear


async def test_streamed_logprobs_batched_equal_the_request_alone():
    """A streamed request's chunks carry its tokens' logprobs (the prompt's with the first): the
    same alone as beside other rows, and put together they are the result's."""
    model = tiny_model(block_size=64)
    tok = model.tokenizer
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=5, logprobs=2, prompt_logprobs=1)
    prompt = tok.encode("streamed and scored")

    async def streamed(engine):
        handle = engine.submit(prompt, params)
        chunks = [c async for c in handle]
        return chunks, await handle.result()

    def entries(items):
        return [(e.token, [t for t, _ in e.top]) for e in items if e is not None]

    async with running_engine(model) as engine:
        alone, alone_result = await asyncio.wait_for(streamed(engine), DEADLINE)
        others = [engine.submit(tok.encode(t), SamplingParams(max_new_tokens=9, temperature=1.0, seed=i))
                  for i, t in enumerate(["a neighbour", "yz"])]
        together, _ = await asyncio.wait_for(streamed(engine), DEADLINE)
        await asyncio.wait_for(asyncio.gather(*(h.result() for h in others)), DEADLINE)
    a = [e for c in alone for e in c.logprobs or ()]
    b = [e for c in together for e in c.logprobs or ()]
    assert len(a) == 6 and entries(a) == entries(b) and entries(a) == entries(alone_result.logprobs)
    assert all(abs(x.logprob - y.logprob) < 1e-5 for x, y in zip(a, b))
    assert entries(alone[0].prompt_logprobs) == entries(together[0].prompt_logprobs)
    assert all(abs(x.logprob - y.logprob) < 1e-5
               for x, y in zip(alone[0].prompt_logprobs[1:], together[0].prompt_logprobs[1:]))
