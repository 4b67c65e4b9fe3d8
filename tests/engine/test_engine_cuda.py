"""CUDA checks (run by bench/gpu_check.sh on a GPU machine; skipped elsewhere)."""

import asyncio
import copy

import pytest
import torch

from engine_helpers import tiny_model
from model.engine import Engine, EngineConfig
from model.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_model(dtype=torch.float32, block_size=64):
    cpu = tiny_model(block_size=block_size, vocab_size=40)
    model = copy.deepcopy(cpu).to("cuda", dtype)
    model.tokenizer = cpu.tokenizer
    return cpu, model


def step_logits(model, ids):
    device = next(model.parameters()).device
    from model.gpt import KVCache
    cache = KVCache(model.config, 1, device, next(model.parameters()).dtype)
    with torch.inference_mode():
        idx = torch.tensor([ids], device=device)
        return model.step(idx, torch.zeros(1, dtype=torch.long, device=device), cache).float().cpu()


async def run_requests(model, requests, **config):
    engine = Engine(model, EngineConfig(**{"max_batch": 4, **config}))
    await engine.start()
    try:
        handles = [engine.submit(p, sp) for p, sp in requests]
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)
    finally:
        await engine.stop(drain=False)
    return [r.token_ids for r in results]


def requests_for(tok):
    prompts = ["the cat sat", "a", "hello there, how are you", "zebra", "x y z"]
    params = [SamplingParams(max_new_tokens=40, temperature=0.0),
              SamplingParams(max_new_tokens=30, temperature=1.0, top_k=0, seed=3),
              SamplingParams(max_new_tokens=50, temperature=0.8, top_k=10, seed=4),
              SamplingParams(max_new_tokens=20, temperature=0.0),
              SamplingParams(max_new_tokens=45, temperature=0.7, top_p=0.8, seed=5)]
    return [(tok.encode(p), sp) for p, sp in zip(prompts, params)]


def test_cuda_float32_logits_match_cpu():
    cpu, gpu = gpu_model()
    ids = cpu.tokenizer.encode("the quick brown fox")
    torch.testing.assert_close(step_logits(gpu, ids), step_logits(cpu, ids), atol=1e-3, rtol=1e-3)


def test_bfloat16_within_tolerance():
    cpu, gpu = gpu_model(torch.bfloat16)
    ids = cpu.tokenizer.encode("the quick brown fox")
    ref, got = step_logits(cpu, ids), step_logits(gpu, ids)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


async def test_cuda_engine_equals_cpu_engine_and_graphs_equal_eager():
    cpu, gpu = gpu_model()
    requests = requests_for(cpu.tokenizer)
    on_cpu = await run_requests(cpu, requests)
    graphs = await run_requests(gpu, requests, cuda_graphs=True)
    eager = await run_requests(gpu, requests, cuda_graphs=False)
    assert graphs == eager == on_cpu


async def test_prompts_over_several_chunks_prefill_through_graphs_like_eager():
    """Small chunks: prompts take several captured one-row prefills at growing positions
    while other rows decode."""
    cpu, gpu = gpu_model()
    tok = cpu.tokenizer
    prompts = ["the quick brown fox jumps over the lazy dog", "a", "zebras graze on the plain at dawn"]
    requests = [(tok.encode(p), SamplingParams(max_new_tokens=15, temperature=0.0)) for p in prompts]
    on_cpu = await run_requests(cpu, requests, prefill_chunk=16)
    graphs = await run_requests(gpu, requests, prefill_chunk=16, cuda_graphs=True)
    eager = await run_requests(gpu, requests, prefill_chunk=16, cuda_graphs=False)
    assert graphs == eager == on_cpu


async def test_bfloat16_engine_with_graphs_runs_batched_like_solo():
    cpu, gpu = gpu_model(torch.bfloat16)
    requests = requests_for(cpu.tokenizer)
    batched = await run_requests(gpu, requests)
    solo = [(await run_requests(gpu, [r]))[0] for r in requests]
    assert [len(t) for t in batched] == [sp.max_new_tokens for _, sp in requests]
    assert batched == solo


async def test_triton_kernels_equal_torch_operators_and_their_graphs_equal_eager():
    cpu, gpu = gpu_model()
    requests = requests_for(cpu.tokenizer)
    torch_ops = await run_requests(gpu, requests, cuda_kernels="torch")
    graphs = await run_requests(gpu, requests, cuda_kernels="triton")
    eager = await run_requests(gpu, requests, cuda_kernels="triton", cuda_graphs=False)
    assert graphs == eager == torch_ops


@pytest.mark.parametrize("rows", [8, 20, 32])
async def test_triton_batches_of_8_to_32_rows_past_128_positions_equal_torch(rows):
    """Batch buckets 8-32, prompts of 130-250 tokens: one graph per batch size serves them all."""
    cpu, gpu = gpu_model(block_size=512)
    g = torch.Generator().manual_seed(rows)
    prompts = [torch.randint(0, 30, (int(n),), generator=g).tolist() for n in torch.randint(130, 250, (rows,), generator=g)]
    requests = [(p, SamplingParams(max_new_tokens=24, temperature=0.0 if i % 2 else 0.8, top_k=20, seed=i))
                for i, p in enumerate(prompts)]
    torch_ops = await run_requests(gpu, requests, cuda_kernels="torch", max_batch=32)
    triton = await run_requests(gpu, requests, cuda_kernels="triton", max_batch=32)
    assert triton == torch_ops


@pytest.mark.parametrize("cuda_kernels", ["torch", "triton"])
async def test_async_scheduling_with_graphs_gives_the_synchronous_tokens(cuda_kernels):
    """Async scheduling on CUDA graphs (pinned double buffers, carried tokens taken on the device):
    the same tokens as without it, with an eos that ends a request one step late."""
    cpu, gpu = gpu_model()
    requests = requests_for(cpu.tokenizer)
    first = await run_requests(gpu, requests, cuda_kernels=cuda_kernels)
    gpu.tokenizer.eot_id = first[0][5]  # request 0 (and any other drawing it) now ends at eos
    sync = await run_requests(gpu, requests, cuda_kernels=cuda_kernels)
    assert sync[0] == first[0][:first[0].index(first[0][5])]
    assert await run_requests(gpu, requests, cuda_kernels=cuda_kernels, async_scheduling=True) == sync
