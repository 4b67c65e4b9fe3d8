"""The serving engine: continuous batching of many requests over one model and a static KV cache.

    from model.engine import Engine, EngineConfig
    engine = Engine(model, EngineConfig(max_batch=8))
    await engine.start()
    handle = engine.submit(prompt_ids, SamplingParams(max_new_tokens=50))
    async for chunk in handle: ...                  # TokenChunks as they are sampled
    result = await handle.result()                  # GenerationResult

Where things live (imports point down this list, and into the library: model.gpt,
model.sampling, model.generate; model.kernels for the CPU and Triton kernels):

    core.py         Engine: lifecycle, submit/cancel, the worker loop, step()
    scheduler.py    Scheduler and its state; StepPlan (PrefillChunk, DecodeBatch): schedule(), update()
    runner.py       ModelRunner: the KV cache, start-up set-up and warm-up, execute(plan)
    cuda_graphs.py  DecodeGraphs: the captured decode and one-row prefill steps
    cpu_setup.py    choose_cpu_linear / choose_cpu_attention: CPU kernels or torch, timed at start
    cuda_setup.py   choose_cuda_kernels: the Triton decode path or torch's operators (CUDA_KERNELS)
    request.py      RequestHandle, Outbox, TokenChunk, GenerationResult, EngineStats
    config.py       EngineConfig
    errors.py       EngineError and its subclasses
"""

from model.engine.config import EngineConfig
from model.engine.core import Engine
from model.engine.cpu_setup import choose_cpu_attention, choose_cpu_linear
from model.engine.errors import EngineError, EngineStopped, Overloaded, PromptTooLong
from model.engine.request import EngineStats, GenerationResult, RequestHandle, TokenChunk
from model.engine.scheduler import DecodeBatch, PrefillChunk, StepPlan
from model.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineError", "EngineStats", "EngineStopped", "GenerationResult",
           "Overloaded", "PromptTooLong", "RequestHandle", "SamplingParams", "TokenChunk", "choose_cpu_linear",
           "choose_cpu_attention", "StepPlan", "PrefillChunk", "DecodeBatch"]
