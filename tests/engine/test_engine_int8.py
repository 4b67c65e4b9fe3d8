"""An int8 model (model/quant.py) through the engine: its weights keep their own modules, the
engine's greedy tokens are full recomputation's, and a float-only kernel asked for by name is refused."""

from __future__ import annotations

import pytest

from engine_helpers import full_recompute_greedy, one_thread, tiny_model  # noqa: F401 (fixture)
from model.engine import Engine, EngineConfig, SamplingParams
from model.engine.cpu_setup import choose_cpu_linear
from model.quant import quantize_model


async def test_an_int8_model_decodes_as_full_recomputation():
    model = quantize_model(tiny_model(block_size=64))
    prompt = model.tokenizer.encode("the cat sat")
    engine = Engine(model, EngineConfig(max_batch=2, max_queue=4, cuda_graphs=False, seed=0))
    await engine.start()
    try:
        result = await engine.submit(prompt, SamplingParams(max_new_tokens=12, temperature=0)).result()
    finally:
        await engine.stop()
    assert result.token_ids == full_recompute_greedy(model, prompt, 12)


@pytest.mark.parametrize("choice", ["kernel", "in_out"])
def test_float_only_linear_paths_are_refused_for_int8_weights(choice):
    with pytest.raises(ValueError, match=f"cpu_linear '{choice}' needs float weights"):
        choose_cpu_linear(quantize_model(tiny_model()), choice)
