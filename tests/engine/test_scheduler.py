"""The scheduler (model/engine/scheduler.py) alone: its plans, step by step, with no model and no
worker thread. Each test drives schedule() -> (tokens the test chooses) -> update()."""

from __future__ import annotations

import asyncio

import pytest

from engine_helpers import ITOS
from model.engine import DecodeBatch, EngineConfig, PrefillChunk, StepPlan
from model.engine.request import Outbox, RequestHandle
from model.engine.scheduler import Request, Scheduler
from model.generate import TextStream
from model.sampling import SamplingParams
from model.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer(ITOS)
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
FOREVER = SamplingParams(max_new_tokens=10_000, temperature=0.0)


def scheduler(bucket=lambda n: n, **config) -> Scheduler:
    return Scheduler(EngineConfig(**{"max_batch": 4, **config}), block_size=32, eot_id=None, bucket=bucket)


def queue(sched: Scheduler, text: str, params: SamplingParams = GREEDY) -> Request:
    ids = TOKENIZER.encode(text)
    req = Request(handle=RequestHandle(sched, asyncio.get_running_loop()), params=params, tokens=ids,
                  prompt_len=len(ids), stream=TextStream(TOKENIZER, params.stop), submitted=0.0)
    sched.add(req)
    return req


def step(sched: Scheduler, token: int = 1) -> StepPlan:
    """One step as the engine runs it, every decoding row sampling `token`."""
    out = Outbox()
    plan = sched.schedule(out)
    sched.update(plan, [token] * (len(plan.decode.rows) if plan.decode else 0), out)
    out.send()
    return plan


def chunk(rows, pos, prompts, n) -> PrefillChunk:
    return PrefillChunk(tuple(rows), tuple(pos), tuple(tuple(TOKENIZER.encode(p)[:n]) for p in prompts))


async def test_equal_length_prompts_prefill_as_one_chunk_and_decode_in_the_same_step():
    """Four 10-token prompts: one chunk of 9 tokens for rows 0-3, whose last tokens decode in
    the same step; two finish at once, and the two waiting prompts then share one chunk in the
    scattered rows 1 and 3."""
    sched = scheduler(prefill_chunk=64)
    prompts = ["the cat sa", "a dog ran.", "zebras nap", "owls hoot,", "bees buzz.", "frogs jump"]
    lengths = [15, 1, 15, 1, 12, 12]
    for p, n in zip(prompts, lengths):
        queue(sched, p, SamplingParams(max_new_tokens=n, temperature=0.0))
    first = step(sched)
    assert first.prefill == (chunk(range(4), [0] * 4, prompts[:4], 9),)
    assert first.decode.rows == (0, 1, 2, 3) and first.decode.pos == (9, 9, 9, 9)
    assert first.decode.idx == tuple(TOKENIZER.encode(p)[9] for p in prompts[:4])
    second = step(sched)  # rows 1 and 3 finished after one token each
    assert second.prefill == (chunk([1, 3], [0, 0], prompts[4:], 9),)
    assert second.decode.rows == (0, 1, 2, 3) and second.decode.pos == (10, 9, 10, 9)


async def test_prefill_budget_is_large_only_while_no_row_decodes():
    """A burst into an idle scheduler prefills past prefill_chunk in one chunk; once a row is
    decoding, a step's prefill stays within prefill_chunk, so the decoder is not stalled."""
    sched = scheduler(prefill_chunk=4, idle_prefill_chunk=64)
    prompts = ["the cat sa", "a dog ran.", "zebras nap"]
    for p in prompts:
        queue(sched, p, FOREVER)
    assert step(sched).prefill == (chunk(range(3), [0] * 3, prompts, 9),)  # 27 tokens while prefill_chunk is 4
    queue(sched, "owls hoot,")
    plans = [step(sched) for _ in range(3)]
    assert [c.rows for p in plans for c in p.prefill] == [(3,), (3,), (3,)]
    assert [len(c.ids[0]) for p in plans for c in p.prefill] == [4, 4, 1]  # 9 prompt tokens, 4 at most a step
    assert [p.decode.rows for p in plans] == [(0, 1, 2)] * 2 + [(0, 1, 2, 3)]


@pytest.mark.parametrize("idle_prefill_chunk, rows", [(64, (1, 2, 3, 4)), (6, (1, 2))])
async def test_prompts_that_outnumber_the_decoding_rows_start_together(idle_prefill_chunk, rows):
    """Four prompts arrive while one row decodes: the step's budget is prefill_chunk per
    decoding row for each of them (4 x 3 tokens), so all four prefill in one chunk rather
    than one per step behind the decoder; never past idle_prefill_chunk (6: two of them)."""
    sched = scheduler(max_batch=5, prefill_chunk=3, idle_prefill_chunk=idle_prefill_chunk)
    queue(sched, "the cat", FOREVER)
    assert step(sched).decode.rows == (0,)  # decoding from now on
    prompts = ["abcd", "efgh", "ijkl", "mnop"]
    for p in prompts:
        queue(sched, p)
    plan = step(sched)
    assert plan.prefill == (chunk(rows, [0] * len(rows), prompts[:len(rows)], 3),)
    assert plan.decode.rows == (0, *rows)  # each chunk leaves its row one token: it decodes now


async def test_rows_that_ride_along_write_where_nothing_lives():
    """A decode over rows 0..B-1 (B from the runner's bucket) gives a prefilling row its next
    prefill position and a free row position 0; neither samples."""
    sched = scheduler(bucket=lambda n: 4, prefill_chunk=4, idle_prefill_chunk=4)
    queue(sched, "ab", SamplingParams(max_new_tokens=1, temperature=0.0))  # row 0, done after one token
    queue(sched, "cd", FOREVER)  # row 1
    first = step(sched)
    assert first.prefill == (chunk([0, 1], [0, 0], ["ab", "cd"], 1),) and first.decode.rows == (0, 1)
    queue(sched, "the quick brown fox jumps", FOREVER)  # takes row 0, freed by the first request
    d = step(sched).decode
    assert isinstance(d, DecodeBatch) and d.rows == (1,)
    assert d.pos == (4, 2, 0, 0)  # row 0 past this step's 4-token chunk; rows 2 and 3 free
    assert d.idx == (0, 1, 0, 0)  # only row 1 feeds a token: the one it sampled last step
    assert d.members[0] is None and d.members[2:] == (None, None) and d.members[1] is not None
    assert d.params[1] is FOREVER and d.params[0] is None


async def test_cancelled_requests_end_at_the_next_schedule_and_free_their_rows():
    sched = scheduler(max_batch=1)
    running, waiting = queue(sched, "abc", FOREVER), queue(sched, "de", FOREVER)
    step(sched)
    assert sched.state.rows[0] is running
    running.handle.cancel()
    waiting.handle.cancel()
    out = Outbox()
    plan = sched.schedule(out)
    assert plan == StepPlan() and sched.state.free == [0] and not sched.state.waiting
    out.send()
    for req in (running, waiting):
        result = await asyncio.wait_for(req.handle.result(), 5)
        assert result.finish_reason == "cancelled"
