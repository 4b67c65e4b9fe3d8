"""The model runner (model/engine/runner.py): it executes a plan it is given, on CPU eagerly.
(CUDA graphs: tests/engine/test_engine_cuda.py.)"""

from __future__ import annotations

import pytest
import torch

from engine_helpers import full_recompute_greedy, one_thread, tiny_model  # noqa: F401 (autouse fixture)
from model.engine import DecodeBatch, EngineConfig, PrefillChunk, StepPlan
from model.engine.runner import ModelRunner
from model.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)


@pytest.fixture
def runner():
    runner = ModelRunner(tiny_model(), EngineConfig(max_batch=4, cpu_linear="out_in", cpu_attention="torch"))
    runner.setup()
    return runner


def spy_forwards(model) -> list:
    """Each GPT.step_parts call: (idx shape, scattered rows or None) per batch in it."""
    calls, step_parts = [], model.step_parts

    def spy(parts, cache):
        calls.append([(tuple(p.idx.shape), None if p.rows is None else p.rows.tolist()) for p in parts])
        return step_parts(parts, cache)
    model.step_parts = spy
    return calls


def test_eager_runs_the_chunks_and_the_decode_in_one_pass_and_samples_the_decoding_rows(runner):
    """A chunk for the scattered rows 1 and 3 and the decode of rows 0..3, where only 1 and 3
    sample: one GPT.step_parts call, and each row's token is full recompute's."""
    tok = runner.model.tokenizer
    a, b = tok.encode("the cat sa"), tok.encode("a dog ran.")  # of one length: one chunk
    plan = StepPlan(
        prefill=(PrefillChunk(rows=(1, 3), pos=(0, 0), ids=(tuple(a[:-1]), tuple(b[:-1]))),),
        decode=DecodeBatch(rows=(1, 3), idx=(0, a[-1], 0, b[-1]), pos=(0, len(a) - 1, 0, len(b) - 1),
                           steps=(0, 0, 0, 0), members=(None, 0, None, 1), params=(None, GREEDY, None, GREEDY),
                           seeds=(0, 0, 0, 0)))
    calls = spy_forwards(runner.model)
    with torch.inference_mode():
        tokens = runner.execute(plan)
    assert calls == [[((2, len(a) - 1), [1, 3]), ((4, 1), None)]]
    assert tokens == [full_recompute_greedy(runner.model, a, 1)[0], full_recompute_greedy(runner.model, b, 1)[0]]
    assert runner.last_batch == 2 and runner.total_steps == 1


def test_chunks_alone_run_without_sampling(runner):
    tok = runner.model.tokenizer
    a = tok.encode("zebras nap")
    calls = spy_forwards(runner.model)
    with torch.inference_mode():
        tokens = runner.execute(StepPlan(prefill=(PrefillChunk(rows=(0,), pos=(0,), ids=(tuple(a[:4]),)),)))
    assert tokens == [] and calls == [[((1, 4), None)]] and runner.last_batch == 0 and runner.total_steps == 0
