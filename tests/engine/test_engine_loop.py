"""The batching engine on CPU, with a tiny random model. Waits are on results with deadlines."""

import asyncio
import contextlib

import pytest
import torch

from engine_helpers import one_thread, tiny_model  # noqa: F401 (autouse fixture)
import model.engine.runner as runner_module
from model.engine import Engine, EngineConfig, EngineStopped, Overloaded, PromptTooLong
from model.generate import generate_ids
from model.sampling import SamplingParams

DEADLINE = 30.0
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@contextlib.asynccontextmanager
async def running_engine(model=None, **config):
    engine = Engine(model or tiny_model(), EngineConfig(**{"max_batch": 4, **config}))
    await engine.start()
    try:
        yield engine
    finally:
        await asyncio.wait_for(engine.stop(drain=False), DEADLINE)


async def collect(handle):
    """Stream a request to the end; return (result, concatenated streamed text)."""
    streamed = ""
    async with asyncio.timeout(DEADLINE):
        async for chunk in handle:
            streamed += chunk.text
        return await handle.result(), streamed


def assert_no_leak(engine):
    st = engine.scheduler.state
    assert sorted(st.free) == list(range(engine.config.max_batch))
    assert all(s is None for s in st.rows) and not st.waiting
    assert engine.stats().running == 0 and engine.stats().kv_cache_usage == 0


def mixed_requests(tok):
    prompts = ["the cat", "a", "hello there, how are you", "zebra crossing.", "x y z", "dogs and cats\n"]
    params = [
        GREEDY,
        SamplingParams(max_new_tokens=20, temperature=1.0, top_k=0, seed=11),
        SamplingParams(max_new_tokens=5, temperature=0.7, top_k=5, top_p=0.9, seed=12),
        SamplingParams(max_new_tokens=17, temperature=0.0),
        SamplingParams(max_new_tokens=9, temperature=1.2, top_k=10, seed=13),
        SamplingParams(max_new_tokens=14, temperature=0.5, top_p=0.7, seed=14),
    ]
    return [tok.encode(p) for p in prompts], params


@pytest.mark.parametrize("cpu_linear, cpu_attention, dtype", [
    ("out_in", "torch", torch.float32),  # torch's operators throughout
    ("kernel", "kernel", torch.float32),  # model/kernels/cpu.py
    ("kernel", "kernel", torch.bfloat16),  # ... with half-precision weights and cache
    ("kernel", "torch", torch.bfloat16),  # ... with torch's attention over a float32 cache
])
async def test_batched_equals_solo_for_greedy_and_seeded_requests(cpu_linear, cpu_attention, dtype):
    model = tiny_model().to(dtype)
    prompts, params = mixed_requests(model.tokenizer)
    async with running_engine(model, max_batch=4, prefill_chunk=6, idle_prefill_chunk=6,
                              cpu_linear=cpu_linear, cpu_attention=cpu_attention) as engine:
        cache_dtype = torch.float32 if cpu_attention == "torch" else dtype  # gpt.kv_cache_dtype
        assert engine.runner.cache.k.dtype == cache_dtype and engine.kv_cache_bytes == engine.runner.cache.nbytes
        solo = [(await collect(engine.submit(p, sp)))[0] for p, sp in zip(prompts, params)]
        handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]  # 6 requests, 4 rows
        batched = await asyncio.gather(*(collect(h) for h in handles))
        assert_no_leak(engine)
    for s, (b, streamed) in zip(solo, batched):
        assert b.token_ids == s.token_ids and b.text == s.text == streamed
        assert b.finish_reason == "length"
    assert [r.completion_tokens for r in solo] == [sp.max_new_tokens for sp in params]
    # ... and equal to generate_text's path for the same seed
    for p, sp, s in zip(prompts, params, solo):
        if sp.seed is not None or sp.greedy:
            assert list(generate_ids(model, p, sp, sp.seed or 0, model.tokenizer.n_vocab)) == s.token_ids


async def test_batch_invariant_engine_gives_each_step_the_same_logits_alone_batched_and_chunked(monkeypatch):
    """batch_invariant: every decode's logits, to the bit, are those the same context got alone
    (one request at a time, prompts in chunks of 4) and batched (six requests on four rows,
    chunks of 6, contexts sliding past block_size); torch's linear and attention never run."""
    model = tiny_model().to(torch.bfloat16)
    prompts, params = mixed_requests(model.tokenizer)
    prompts[2] = model.tokenizer.encode("hello there, how are you now")  # 28 tokens + 16: slides past 32
    params[2] = SamplingParams(max_new_tokens=16, temperature=0.7, top_k=5, top_p=0.9, seed=12)
    seen: list[dict] = []  # per run: context (prompt + generated) -> that decode's logits
    engines: list[Engine] = []
    sample = runner_module.sample

    def recording(logits, bp, step, n_vocab):
        if engines:  # not the first engine's warm-up (the second's finds the first's rows empty)
            rows = engines[-1].scheduler.state.rows[:logits.shape[0]]
            seen[-1].update({tuple(s.tokens): logits[r].clone() for r, s in enumerate(rows) if s and s.in_flight})
        return sample(logits, bp, step, n_vocab)
    monkeypatch.setattr(runner_module, "sample", recording)

    def refuse(*args, **kwargs):
        raise AssertionError("torch's linear/attention called in batch-invariant mode")
    monkeypatch.setattr(torch.nn.functional, "linear", refuse)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)
    results = []
    for chunk, together in ((4, False), (6, True)):
        async with running_engine(model, max_batch=4, prefill_chunk=chunk, idle_prefill_chunk=chunk,
                                  batch_invariant=True) as engine:
            engines.append(engine)
            seen.append({})
            if together:
                handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
                results.append([r for r, _ in await asyncio.gather(*(collect(h) for h in handles))])
            else:
                results.append([(await collect(engine.submit(p, sp)))[0] for p, sp in zip(prompts, params)])
            assert_no_leak(engine)
    assert [r.token_ids for r in results[0]] == [r.token_ids for r in results[1]]
    assert seen[0].keys() == seen[1].keys() and len(seen[0]) >= sum(sp.max_new_tokens for sp in params) - 6
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])


async def test_batch_invariant_mode_is_refused_off_the_cpu_and_against_torch_kernels():
    with pytest.raises(ValueError, match="runs on CPU only so far; this model is on meta"):
        async with running_engine(tiny_model().to("meta"), batch_invariant=True):
            pass
    with pytest.raises(ValueError, match="cpu_linear 'out_in' contradicts it"):
        async with running_engine(batch_invariant=True, cpu_linear="out_in"):
            pass


async def test_equal_length_prompts_prefilled_together_match_solo():
    """Six 10-token prompts on four rows, all admitted by one step: four share a chunk, two
    finish at once and the waiting two then share one in the scattered rows 1 and 3 (the
    plans: tests/engine/test_scheduler.py); every request gets the tokens it gets alone."""
    model = tiny_model()
    prompts = [model.tokenizer.encode(t) for t in
               ("the cat sa", "a dog ran.", "zebras nap", "owls hoot,", "bees buzz.", "frogs jump")]
    params = [SamplingParams(max_new_tokens=n, temperature=t, top_k=5, seed=20 + i)
              for i, (n, t) in enumerate([(15, 0.0), (1, 0.9), (15, 0.8), (1, 0.0), (12, 0.0), (12, 1.1)])]
    async with running_engine(model, max_batch=4, prefill_chunk=64) as engine:
        solo = [(await collect(engine.submit(p, sp)))[0] for p, sp in zip(prompts, params)]
        with engine.scheduler.cv:  # the worker admits all six at its next step, not the first alone
            handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
        batched = await asyncio.gather(*(collect(h) for h in handles))
        assert_no_leak(engine)
    for s, (b, streamed) in zip(solo, batched):
        assert b.token_ids == s.token_ids and b.text == streamed


async def test_long_prompts_span_several_prefill_chunks_and_cross_block_size():
    model = tiny_model(block_size=32)
    tok = model.tokenizer
    prompt = tok.encode("the quick brown fox jumps over")  # 30 tokens of a 32-token context
    params = [SamplingParams(max_new_tokens=70, temperature=0.0),
              SamplingParams(max_new_tokens=50, temperature=0.9, seed=5)]
    async with running_engine(model, max_batch=3, prefill_chunk=4, idle_prefill_chunk=4) as engine:
        results = await asyncio.gather(*(collect(engine.submit(prompt, sp)) for sp in params),
                                       collect(engine.submit(tok.encode("ab"), GREEDY)))
        assert_no_leak(engine)
    for sp, (r, _) in zip(params, results):
        assert r.token_ids == list(generate_ids(model, prompt, sp, sp.seed or 0, tok.n_vocab))
        assert r.completion_tokens == sp.max_new_tokens


async def test_a_reader_that_falls_behind_gets_what_has_arrived_in_one_chunk():
    async with running_engine() as engine:
        prompt = engine.tokenizer.encode("the cat")
        live = engine.submit(prompt, GREEDY)
        late = engine.submit(prompt, GREEDY)
        result, streamed = await collect(live)  # read as tokens come
        assert (await late.result()).token_ids == result.token_ids
        chunks = [c async for c in late]  # everything arrived before the first read
        assert len(chunks) == 1
        assert chunks[0].token_ids == result.token_ids and chunks[0].text == streamed == result.text
        assert [c async for c in late] == []  # the end stays the end


async def test_cancellation_frees_the_row():
    async with running_engine(max_batch=2) as engine:
        handle = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=10_000, temperature=0.0))
        other = engine.submit([4, 5], GREEDY)
        async with asyncio.timeout(DEADLINE):
            await anext(handle)  # it is running
        handle.cancel()
        result, _ = await collect(handle)
        assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 10_000
        assert (await collect(other))[0].finish_reason == "length"
        waiting = engine.submit([1], SamplingParams(max_new_tokens=10_000))
        waiting.cancel()  # cancelled before or after admission: either way it ends
        assert (await collect(waiting))[0].finish_reason == "cancelled"
        assert_no_leak(engine)


async def test_overload_rejects_cleanly_and_the_rest_complete():
    async with running_engine(max_batch=1, max_queue=3) as engine:
        accepted, rejected = [], []
        long = SamplingParams(max_new_tokens=10_000, temperature=0.0)  # none can finish meanwhile
        for _ in range(6):  # 3 waiting fit, plus 1 running if the worker admitted one already
            try:
                accepted.append(engine.submit([1, 2], long))
            except Overloaded as err:
                rejected.append(err)
        assert len(accepted) in (3, 4) and len(rejected) == 6 - len(accepted)
        assert all(1.0 <= err.retry_after <= 60.0 for err in rejected)
        for h in accepted:
            h.cancel()
            assert (await collect(h))[0].finish_reason == "cancelled"
        assert (await collect(engine.submit([1, 2], GREEDY)))[0].finish_reason == "length"
        assert_no_leak(engine)


@pytest.mark.slow
async def test_no_slot_leak_after_thousands_of_short_requests():
    async with running_engine(max_batch=8, max_queue=64) as engine:
        prompts = [[i % 30, (i * 7) % 30] for i in range(2000)]
        for start in range(0, len(prompts), 64):
            handles = [engine.submit(p, SamplingParams(max_new_tokens=1 + i % 3, temperature=0.0))
                       for i, p in enumerate(prompts[start:start + 64])]
            if start % 256 == 0:
                handles[0].cancel()
            results = await asyncio.gather(*(h.result() for h in handles))
            assert all(r.finish_reason in ("length", "cancelled") for r in results)
        assert_no_leak(engine)


async def test_stop_strings_and_eos():
    model = tiny_model()
    prompt = model.tokenizer.encode("abc")
    async with running_engine(model) as engine:
        full = (await collect(engine.submit(prompt, SamplingParams(max_new_tokens=25, temperature=0.0))))[0]
        stop = full.text[6:9]
        params = SamplingParams(max_new_tokens=25, temperature=0.0, stop=(stop, "\u2603"))
        result, streamed = await collect(engine.submit(prompt, params))
        assert result.finish_reason == "stop"
        assert result.text == streamed == full.text[: full.text.index(stop)]
    eot = full.token_ids[4]
    model = tiny_model(eot_id=eot)
    async with running_engine(model) as engine:
        result, _ = await collect(engine.submit(prompt, SamplingParams(max_new_tokens=25, temperature=0.0)))
        assert result.finish_reason == "eos" and result.token_ids == full.token_ids[: full.token_ids.index(eot)]
        no_stop = SamplingParams(max_new_tokens=25, temperature=0.0, stop_at_eot=False)
        assert (await collect(engine.submit(prompt, no_stop)))[0].token_ids == full.token_ids


async def test_submit_errors_and_stop():
    async with running_engine() as engine:
        with pytest.raises(PromptTooLong) as err:
            engine.submit([1] * 32, GREEDY)
        assert (err.value.n_tokens, err.value.limit) == (32, 32)
        with pytest.raises(ValueError, match="empty"):
            engine.submit([], GREEDY)
        with pytest.raises(ValueError, match="top_p"):
            engine.submit([1], SamplingParams(top_p=2.0))
        stats = engine.stats()
        assert stats.kv_cache_bytes == engine.runner.cache.nbytes > 0 and stats.max_batch == 4
        assert engine.ready and engine.alive and engine.device == "cpu" and engine.dtype == "float32"
        handle = engine.submit([1, 2], SamplingParams(max_new_tokens=20, temperature=0.0))
        await asyncio.wait_for(engine.stop(drain=True), DEADLINE)  # drains: the request completes
        assert (await collect(handle))[0].finish_reason == "length"
        assert not engine.alive and not engine.ready
        with pytest.raises(EngineStopped):
            engine.submit([1], GREEDY)


async def test_a_failing_step_fails_its_requests_and_the_engine_goes_on():
    model = tiny_model()
    async with running_engine(model) as engine:
        real_step, calls = model.step_parts, []

        def flaky_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return real_step(*args, **kwargs)

        model.step_parts = flaky_step
        result, _ = await collect(engine.submit([1, 2, 3], GREEDY))
        assert result.finish_reason == "error" and "boom" in result.error
        del model.step_parts  # back to the class's method
        assert (await collect(engine.submit([1, 2, 3], GREEDY)))[0].finish_reason == "length"
        assert_no_leak(engine)
        assert engine.alive


async def test_padded_vocab_is_never_sampled_even_when_the_model_prefers_it():
    model = tiny_model(vocab_size=40)  # the tokenizer has 30 ids; 30..39 are padding
    with torch.no_grad():  # every position's final hidden state is e0; padded ids' logits are 100
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[30:, 0] = 100.0
    params = [SamplingParams(max_new_tokens=20, temperature=0.0),
              SamplingParams(max_new_tokens=20, temperature=1.0, top_k=0, seed=1),
              SamplingParams(max_new_tokens=20, temperature=1.0, top_k=35, top_p=0.9, seed=2)]
    async with running_engine(model) as engine:
        results = await asyncio.gather(*(collect(engine.submit([1, 2], sp)) for sp in params))
    for r, _ in results:
        assert r.completion_tokens == 20 and max(r.token_ids) < 30
