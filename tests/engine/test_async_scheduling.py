"""Async scheduling (EngineConfig.async_scheduling): a step is launched before the tokens of the
one before are read. The scheduler alone, driven with tokens the test chooses, then the engine
on CPU against itself with async scheduling off."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine_helpers import one_thread, tiny_model  # noqa: F401 (autouse fixture)
from model.engine import Engine, EngineConfig
from model.engine.request import Outbox
from model.sampling import SamplingParams
from test_engine_loop import DEADLINE, assert_no_leak, collect, mixed_requests
from test_scheduler import FOREVER, TOKENIZER, queue, scheduler


def launch(sched):
    """schedule() as the engine runs it with a step in flight: the plan, and its outbox."""
    out = Outbox()
    return sched.schedule(out), out


def fold(sched, plan, tokens, out=None):
    out = out or Outbox()
    sched.update(plan, tokens, out)
    out.send()


async def test_a_row_whose_token_is_in_flight_decodes_again_from_it_on_the_device():
    sched = scheduler()
    req = queue(sched, "abc", FOREVER)
    first, _ = launch(sched)
    assert first.decode.rows == (0,) and first.decode.carried == () and first.decode.pos[0] == 2
    second, _ = launch(sched)  # the first's token is not read yet
    assert second.prefill == () and second.decode.rows == (0,) and second.decode.carried == (0,)
    assert second.decode.idx[0] == 0 and second.decode.pos[0] == 3 and second.decode.steps[0] == 1
    fold(sched, first, [7])
    third, _ = launch(sched)
    assert third.decode.carried == (0,) and third.decode.pos[0] == 4 and third.decode.steps[0] == 2
    fold(sched, second, [8])
    assert req.generated == [7, 8] and req.in_flight == 1 and req.n_cached == 5


async def test_an_eos_seen_one_step_late_drops_the_token_drawn_meanwhile():
    sched = scheduler()
    sched.eot_id = 9
    req = queue(sched, "abc", FOREVER)
    first, _ = launch(sched)
    second, _ = launch(sched)
    fold(sched, first, [9])  # eos: the request ends while its next token is in flight
    assert sched.state.rows[0] is None and req.row == -1
    other = queue(sched, "xyz", FOREVER)  # takes row 0 before the dropped token arrives
    third, _ = launch(sched)
    fold(sched, second, [5])
    assert req.generated == [] and other.generated == [] and other.row == 0 and other.in_flight == 1
    fold(sched, third, [6])
    assert other.generated == [6]


async def test_rows_that_must_stop_or_slide_whatever_their_token_wait_for_it():
    """max_new_tokens and a full context end a row independently of the token in flight, so the
    scheduler plans no decode past them; the row slides from the token once it is read."""
    sched = scheduler()
    short = queue(sched, "ab", SamplingParams(max_new_tokens=2, temperature=0.0))
    first, _ = launch(sched)
    second, _ = launch(sched)
    assert second.decode.carried == (0,)  # token 2 of 2 may be drawn from token 1
    fold(sched, first, [3])
    third, _ = launch(sched)
    assert third.decode is None  # no third token
    fold(sched, second, [4])
    assert short.row == -1 and short.generated == [3, 4]
    long = queue(sched, "x" * 30, FOREVER)  # 30 of 32 positions
    plans = [launch(sched)[0]]
    plans.append(launch(sched)[0])  # writes position 30
    assert plans[1].decode.carried == (0,) and plans[1].decode.pos[0] == 30
    fold(sched, plans[0], [1])
    plans.append(launch(sched)[0])  # writes 31, the last: after it the context slides
    fold(sched, plans[1], [2])
    assert launch(sched)[0].decode is None and long.n_cached == 32
    fold(sched, plans[2], [3])
    assert long.pending == long.tokens[-16:] and long.n_cached == 0 and long.generated == [1, 2, 3]


async def test_a_request_cancelled_while_its_token_is_in_flight_never_gets_it():
    sched = scheduler()
    req = queue(sched, "abc", FOREVER)
    first, _ = launch(sched)
    req.handle.cancel()
    second, out = launch(sched)
    out.send()
    assert second.decode is None and sched.state.rows[0] is None
    fold(sched, first, [4])
    assert req.generated == [] and (await req.handle.result()).finish_reason == "cancelled"


def close_logprobs(a, b) -> bool:
    """The same tokens and alternatives, logprobs within float32 rounding: a batch that differs by
    a row still in it (one step late) may round the products differently."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        x.token == y.token and abs(x.logprob - y.logprob) < 1e-5 and [t for t, _ in x.top] == [t for t, _ in y.top]
        and all(abs(p - q) < 1e-5 for (_, p), (_, q) in zip(x.top, y.top)) for x, y in zip(a, b))


def engine_with(model, async_scheduling: bool, order: list | None = None, **config) -> Engine:
    engine = Engine(model, EngineConfig(**{"max_batch": 4, "prefill_chunk": 6, "idle_prefill_chunk": 6,
                                           "async_scheduling": async_scheduling, **config}))
    if order is not None:  # record launches and reads: ("launch", step) / ("read", step)
        launch, read, count = engine.runner.launch, engine.runner.read, iter(range(10**6))

        def spy_launch(plan, scores=None):
            launched = launch(plan, scores)
            launched.n = next(count)
            order.append(("launch", launched.n, plan.decode.carried if plan.decode else ()))
            return launched

        def spy_read(launched):
            if hasattr(launched, "n"):  # not the runner's own read of a step that scores logprobs
                order.append(("read", launched.n))
            return read(launched)
        engine.runner.launch, engine.runner.read = spy_launch, spy_read
    return engine


async def results_of(engine: Engine, prompts, params) -> list:
    await engine.start()
    try:
        handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
        results = await asyncio.gather(*(collect(h) for h in handles))
        assert_no_leak(engine)
        return results
    finally:
        await asyncio.wait_for(engine.stop(drain=False), DEADLINE)


@pytest.mark.parametrize("dtype, cpu_kernels", [(torch.float32, "torch"), (torch.bfloat16, "kernel")])
async def test_async_engine_gives_the_tokens_text_and_endings_of_the_synchronous_one(dtype, cpu_kernels):
    """Six requests on four rows (greedy, seeded sampling, a stop string, eos, a context that
    slides past block_size, logprobs) give the same results with async scheduling as without,
    each streamed text equal to its result's; and steps really overlap: a step is launched
    before the one before is read, its rows feeding their tokens on the device."""
    model = tiny_model().to(dtype)
    prompts, params = mixed_requests(model.tokenizer)
    params[0] = SamplingParams(max_new_tokens=40, temperature=0.0)  # 7 + 40 tokens: slides past 32
    sync = await results_of(engine_with(model, False, cpu_linear="out_in" if cpu_kernels == "torch" else "kernel",
                                        cpu_attention=cpu_kernels), prompts, params)
    stop_text = sync[3][0].text[4:6]
    params[3] = SamplingParams(max_new_tokens=17, temperature=0.0, stop=(stop_text,))
    params[4] = SamplingParams(max_new_tokens=9, temperature=1.2, top_k=10, seed=13, logprobs=2)
    eot = sync[1][0].token_ids[6]
    model.tokenizer.eot_id = eot  # request 1 (and any other drawing it) ends at eos
    runs = []
    for async_scheduling in (False, True):
        order = []
        engine = engine_with(model, async_scheduling, order, cpu_linear="out_in" if cpu_kernels == "torch"
                             else "kernel", cpu_attention=cpu_kernels)
        runs.append((await results_of(engine, prompts, params), order))
    (sync, _), (async_, order) = runs
    for (s, _), (a, streamed) in zip(sync, async_):
        assert (a.token_ids, a.text, a.finish_reason) == (s.token_ids, s.text, s.finish_reason)
        assert streamed == a.text
        assert close_logprobs(a.logprobs, s.logprobs)
    assert {s.finish_reason for s, _ in sync} >= {"eos", "stop", "length"}
    assert sync[1][0].finish_reason == "eos" and sync[3][0].finish_reason == "stop"
    events = [e[:2] for e in order]
    overlapped = [i for i in range(1, len(events)) if events[i][0] == "launch" and ("read", events[i][1] - 1)
                  in events[i + 1:]]
    assert len(overlapped) > 10  # most steps launched before the one before was read
    assert sum(1 for e in order if e[0] == "launch" and e[2]) > 10  # ... feeding the tokens it drew


async def test_sync_engine_reads_each_step_before_launching_the_next():
    model = tiny_model()
    order = []
    await results_of(engine_with(model, False, order), [model.tokenizer.encode("abc")],
                     [SamplingParams(max_new_tokens=5, temperature=0.0)])
    assert [e[:2] for e in order] == [e for i in range(len(order) // 2) for e in (("launch", i), ("read", i))]
    assert all(not e[2] for e in order if e[0] == "launch")
