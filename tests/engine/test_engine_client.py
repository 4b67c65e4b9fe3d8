"""The engine core in a process of its own (model/engine/client.py + core_process.py) against
the in-process Engine over the same checkpoint: same tokens and text, cancellation, stop
strings, overload, and the core's death noticed."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace

import pytest

from engine_helpers import tiny_model
from model import load_model_from_checkpoint
from model.engine import Engine, EngineConfig, EngineError, Overloaded, PromptTooLong, SamplingParams
from model.engine.client import EngineClient
from model.engine.protocol import CoreSpec
from model.export import save_export

pytestmark = pytest.mark.slow  # each test starts a process that imports torch

CONFIG = EngineConfig(max_batch=4, max_queue=8, cuda_graphs=False, cpu_linear="out_in", cpu_attention="torch", seed=7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(block_size=32)
    return save_export(model, tmp_path_factory.mktemp("ckpt") / "tiny", model.tokenizer.spec())


def spec(checkpoint, **changes) -> CoreSpec:
    return CoreSpec(checkpoint=str(checkpoint), device="cpu", dtype="float32", engine=replace(CONFIG, **changes))


async def run_all(engine, requests):
    handles = [engine.submit(ids, params) for ids, params in requests]
    return await asyncio.gather(*(h.result() for h in handles))


async def with_engine(engine, fn):
    await engine.start()
    try:
        return await fn(engine)
    finally:
        await engine.stop()


async def in_process_and_remote(checkpoint, fn, **changes):
    model = load_model_from_checkpoint(checkpoint, device="cpu", dtype="float32")
    local = await with_engine(Engine(model, replace(CONFIG, **changes)), fn)
    remote = await with_engine(EngineClient(spec(checkpoint, **changes)), fn)
    return local, remote


def fields(r):
    return r.token_ids, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_same_results_as_in_process_greedy_seeded_unseeded_and_stop_strings(checkpoint, async_scheduling):
    """Six concurrent requests over four rows (two queue): greedy, seeded, unseeded (the engine's
    RNG gives seeds in order of arrival), and stop strings that cut the text mid-stream; with
    async scheduling too (the core sees a stop string the client found a step or more late)."""
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [3, 3, 3], [2, 9]]
    params = [SamplingParams(max_new_tokens=12, temperature=0.0),
              SamplingParams(max_new_tokens=15, temperature=1.0, top_k=20, seed=11),
              SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.9),
              SamplingParams(max_new_tokens=20, temperature=1.2, seed=3),
              SamplingParams(max_new_tokens=10, temperature=0.0, stop=("zz",)),
              SamplingParams(max_new_tokens=14, temperature=1.0)]
    requests = list(zip(ids, params))

    async def fn(engine):
        first = await run_all(engine, requests)
        stop = first[0].text[4:6]  # text greedy decoding is known to produce, so the stop is hit
        again = [(i, replace(p, stop=(stop, "never"))) for i, p in requests]
        return first + await run_all(engine, again)

    local, remote = await in_process_and_remote(checkpoint, fn, async_scheduling=async_scheduling)
    assert [fields(r) for r in remote] == [fields(r) for r in local]
    assert local[6].finish_reason == "stop"  # the stop case is exercised, not vacuous
    assert all(r.ttft_s is not None and r.total_s >= r.ttft_s for r in remote)


async def test_streamed_chunks_add_up_to_the_result(checkpoint):
    async def fn(engine):
        handle = engine.submit([1, 2], SamplingParams(max_new_tokens=20, temperature=0.0))
        chunks = [c async for c in handle]
        return chunks, await handle.result()

    chunks, result = await with_engine(EngineClient(spec(checkpoint)), fn)
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert "".join(c.text for c in chunks) == result.text


async def test_cancel_overload_and_errors(checkpoint):
    async def fn(engine):
        with pytest.raises(PromptTooLong):
            engine.submit(list(range(32)), SamplingParams())
        with pytest.raises(ValueError, match="prompt_ids"):
            engine.submit([39], SamplingParams())  # past the tokenizer's 30 characters... the vocab is 30
        long = SamplingParams(max_new_tokens=10_000, temperature=0.0, stop_at_eot=False)
        handles = [engine.submit([1], long) for _ in range(2)]  # max_batch 1 + max_queue 1
        with pytest.raises(Overloaded) as err:
            engine.submit([1], long)
        assert err.value.retry_after >= 1
        async for _ in handles[0]:
            break  # it is decoding
        for h in handles:
            h.cancel()
        results = await asyncio.gather(*(h.result() for h in handles))
        again = await engine.submit([2], SamplingParams(max_new_tokens=3, temperature=0.0)).result()
        return results, again, engine.stats()

    results, again, stats = await with_engine(EngineClient(spec(checkpoint, max_batch=1, max_queue=1)), fn)
    assert [r.finish_reason for r in results] == ["cancelled", "cancelled"]
    assert again.finish_reason == "length" and again.completion_tokens == 3
    assert stats.running == 0 and stats.waiting == 0


async def test_core_death_fails_live_requests_and_is_reported(checkpoint):
    client = EngineClient(spec(checkpoint))
    await client.start()
    try:
        handle = client.submit([1], SamplingParams(max_new_tokens=10_000, temperature=0.0, stop_at_eot=False))
        async for _ in handle:
            break
        os.kill(client.pid, signal.SIGKILL)
        reason = await asyncio.wait_for(client.wait_failed(), 30)
        result = await asyncio.wait_for(handle.result(), 30)
        assert "exit code -9" in reason
        assert result.finish_reason == "error" and result.error == reason
        assert not client.alive and not client.ready
        with pytest.raises(EngineError):
            client.submit([1], SamplingParams())
    finally:
        await client.stop()


async def test_a_core_that_cannot_load_fails_start(tmp_path):
    client = EngineClient(CoreSpec(checkpoint=str(tmp_path / "missing"), device="cpu", engine=CONFIG))
    with pytest.raises(EngineError, match="engine core failed to start"):
        await client.start()
    assert not client.alive


def scored(entries):
    return None if entries is None else [None if e is None else (e.token, round(e.logprob, 5),
                                                                 [t for t, _ in e.top]) for e in entries]


async def test_logprobs_equal_in_process_also_streamed_and_cut_by_a_stop_string(checkpoint):
    """Generated and prompt logprobs (with top alternatives) cross the process boundary: the same
    as in-process in the result and in the stream's chunks; a stop string cuts both at the token
    that completed it; requests that did not ask get none."""
    asked = SamplingParams(max_new_tokens=10, temperature=0.0, logprobs=3, prompt_logprobs=2)

    async def fn(engine):
        first = await run_all(engine, [([1, 2, 3, 4], asked), ([5, 6], SamplingParams(max_new_tokens=6, seed=1)),
                                       ([7, 1], replace(asked, prompt_logprobs=None, temperature=1.0, seed=4))])
        stop = first[0].text[3:5]
        cut = await engine.submit([1, 2, 3, 4], replace(asked, stop=(stop,))).result()
        handle = engine.submit([2, 3, 4], asked)
        chunks = [c async for c in handle]
        return first + [cut, await handle.result()], chunks

    (local, local_chunks), (remote, remote_chunks) = await in_process_and_remote(checkpoint, fn)
    for a, b in zip(local, remote):
        assert fields(a) == fields(b)
        assert scored(a.logprobs) == scored(b.logprobs) and scored(a.prompt_logprobs) == scored(b.prompt_logprobs)
    assert len(local[0].logprobs) == 10 and len(local[0].prompt_logprobs) == 4 and local[2].prompt_logprobs is None
    assert local[1].logprobs is None and local[1].prompt_logprobs is None and remote[1].logprobs is None
    assert local[3].finish_reason == "stop" and len(remote[3].logprobs) == len(remote[3].token_ids) < 10
    for chunks, result in ((local_chunks, local[4]), (remote_chunks, remote[4])):
        assert scored([e for c in chunks for e in c.logprobs or ()]) == scored(result.logprobs)
        assert scored(chunks[0].prompt_logprobs) == scored(result.prompt_logprobs)
        assert all(c.prompt_logprobs is None for c in chunks[1:])
