"""The operators a CUDA decode step launches, counted on CPU over the code path the GPU takes:
the captured graph is `GPT.step(idx, pos, cache, kv_len=L)` (model/engine/cuda_graphs.py), then
`sample()` runs eagerly after it (model/engine/runner.py) on the torch path, while on the Triton
path one sampling kernel is captured in the graph for every sampling configuration. With CUDA_KERNELS=torch no hooks are
installed; with triton (model/engine/cuda_setup.py) model/kernels/triton_decode.py's hooks are,
and its kernel launches are counted by a stub in place of its `_launch`. Each operator that is
not a view or an allocation is about one kernel launch, so these pins are the decode's
kernel budget: a change that adds kernels fails here and must update the pin on purpose."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.kernels import cpu as cpukernels
from model.gpt import GPT, GPTConfig, KVCache
from model.sampling import BatchParams, SamplingParams, sample

B = 4
# Outside the layers: token and position embeddings, positions, the mask, final norm, head.
OUTSIDE = {"embedding": 2, "arange": 2, "add": 2, "le": 1, "layer_norm": 1, "linear": 1}


ALLOCATIONS = {"empty", "empty_strided"}  # memory from the graph's pool: no kernel


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched, leaving out views (they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(r.alias_info is not None for r in func._schema.returns) or func._schema.is_mutable:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def decode_ops(n_layer: int, triton: bool = False, monkeypatch=None) -> collections.Counter:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=n_layer, n_head=2, n_embd=32)).eval()
    launches: collections.Counter = collections.Counter()
    if triton:
        from model.kernels import triton_decode
        triton_decode.use_triton_decode(model, devices=("cpu",))  # the path CUDA takes, on CPU tensors
        monkeypatch.setattr(triton_decode, "_launch",
                            lambda kernel, grid, *a, **kw: launches.update([f"triton:{kernel.fn.__name__}"]))
    with torch.inference_mode():
        cache = KVCache(model.config, B, torch.device("cpu"), torch.float32)
        idx, pos = torch.zeros(B, 1, dtype=torch.long), torch.full((B,), 5)
        with CountOps() as count:
            model.step(idx, pos, cache, kv_len=8)
    return collections.Counter({k: n for k, n in count.ops.items() if k not in ALLOCATIONS}) + launches


def test_decode_step_operators_per_layer_and_outside_the_layers():
    two, three = decode_ops(2), decode_ops(3)
    per_layer = three - two
    outside = two - per_layer - per_layer
    # The inventory: two layer norms, four linears, two residual adds, GELU, an arange,
    # two index_put_ cache writes, SDPA with a boolean mask.
    assert dict(per_layer) == {"linear": 4, "add": 2, "layer_norm": 2, "arange": 1, "index_put_": 2,
                               "scaled_dot_product_attention": 1, "gelu": 1}, per_layer
    assert dict(outside) == OUTSIDE, outside


def test_triton_decode_step_is_five_launches_per_layer(monkeypatch):
    pytest.importorskip("triton")
    two, three = decode_ops(2, True, monkeypatch), decode_ops(3, True, monkeypatch)
    per_layer = three - two
    outside = two - per_layer - per_layer
    # LN1+c_attn, attention (cache writes included), c_proj+residual, LN2+c_fc+GELU, c_proj+residual
    assert dict(per_layer) == {"triton:linear_kernel": 4, "triton:attention_kernel": 1}, per_layer
    # embeddings and their sum, the final norm and the head; no positions or mask: no kv_len is read
    assert dict(outside) == {"embedding": 2, "add": 1, "layer_norm": 1, "linear": 1}, outside


def test_sampling_operators_for_the_seed_api_default(monkeypatch):
    # The tensor ops a GPU runs: the CPU kernels' one-op noise and argmax stand in for them on a
    # CPU where an earlier test has loaded the kernels.
    monkeypatch.setattr(cpukernels, "_loaded", False)
    bp = BatchParams.build([SamplingParams(temperature=0.8, top_k=50)] * B, [1] * B, torch.device("cpu"))
    logits = torch.randn(B, 40)
    with torch.inference_mode(), CountOps() as count:
        sample(logits, bp, torch.zeros(B, dtype=torch.long), 30)
    assert sum(count.ops.values()) == 131, count.ops


def test_fused_sampling_is_one_launch(monkeypatch):
    pytest.importorskip("triton")
    from model.kernels import triton_decode, triton_sampling
    launches: collections.Counter = collections.Counter()
    monkeypatch.setattr(triton_decode, "_launch",
                        lambda kernel, grid, *a, **kw: launches.update([f"triton:{kernel.fn.__name__}"]))
    rows = [SamplingParams(temperature=0.8, top_k=50), SamplingParams(temperature=0.8, top_p=0.9),
            SamplingParams(temperature=1.0, top_k=20, top_p=0.5), SamplingParams(temperature=0.0)]
    bp = BatchParams.build(rows, [1] * B, torch.device("cpu"))  # top-p too: nothing runs after the graph
    logits, step = torch.randn(B, 40), torch.zeros(B, dtype=torch.long)
    with torch.inference_mode(), CountOps() as count:
        triton_sampling.sample(logits, bp.temperature, bp.top_k, bp.top_p, bp.seed, step, 30)
    assert {k: n for k, n in count.ops.items() if k not in ALLOCATIONS} == {} and launches == {"triton:sample_kernel": 1}
