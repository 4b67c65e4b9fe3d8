"""The model core (model/gpt.py): nanoGPT names, weight tying, KV-cache decode == full recompute."""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig, KVCache
from model.gpt import StepPart

CFG = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32, bias=True, gelu_approximate="tanh")


def random_gpt(config: GPTConfig = CFG, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the training init, so bugs change the argmax
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def test_nanogpt_parameter_names():
    names = set(GPT(CFG).state_dict())
    per_block = {"ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"}
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias", "lm_head.weight"}
    expected |= {f"transformer.h.{i}.{n}" for i in range(CFG.n_layer) for n in per_block}
    assert names == expected


def test_no_bias_has_no_bias_parameters():
    cfg = GPTConfig(**{**CFG.__dict__, "bias": False})
    assert not [n for n in GPT(cfg).state_dict() if n.endswith(".bias")]


def test_weight_tying():
    model = GPT(CFG)
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False))
    assert model.num_params() == untied - CFG.vocab_size * CFG.n_embd


def test_forward_shapes():
    logits, loss = random_gpt()(torch.zeros(2, 7, dtype=torch.long))
    assert logits.shape == (2, 7, CFG.vocab_size) and loss is None
    with pytest.raises(ValueError, match="exceeds block_size"):
        random_gpt()(torch.zeros(1, CFG.block_size + 1, dtype=torch.long))


@torch.no_grad()
def test_prefill_then_decode_equals_full_recompute():
    model = random_gpt()
    seq = torch.randint(0, CFG.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    full = model(seq)[0]
    cache = KVCache(CFG, 1)
    prefill = model.step(seq[:, :12], torch.tensor([0]), cache)
    torch.testing.assert_close(prefill, full[:, :12], atol=1e-5, rtol=0)
    for t in range(12, 20):
        step = model.step(seq[:, t:t + 1], torch.tensor([t]), cache)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("kv_len_from", ["positions", "bucket", "block"])
def test_batched_decode_of_mixed_lengths_equals_full_recompute(kv_len_from):
    """Rows of different lengths are prefilled one by one, then decoded together in one call,
    attention reading as many cache positions as needed, the smallest CUDA-graph bucket
    that holds them, or the whole block."""
    model = random_gpt(seed=1)
    g = torch.Generator().manual_seed(2)
    lengths = [5, 13, 1, 9]
    seqs = [torch.randint(0, CFG.vocab_size, (n + 6,), generator=g) for n in lengths]
    cache = KVCache(CFG, len(seqs))
    for row, (n, s) in enumerate(zip(lengths, seqs)):
        last = model.step(s[None, :n], torch.tensor([0]), cache, row0=row, last_only=True)
        torch.testing.assert_close(last[0, -1], model(s[None, :n])[0][0, -1], atol=1e-5, rtol=0)
    pos = torch.tensor(lengths)
    for step in range(6):
        idx = torch.stack([s[n + step] for n, s in zip(lengths, seqs)])[:, None]  # (B, 1)
        needed = int((pos + step).max()) + 1
        kv_len = {"positions": None, "block": CFG.block_size,
                  "bucket": min(n for n in (4, 8, 16, 32) if n >= needed)}[kv_len_from]  # the engine's buckets
        logits = model.step(idx, pos + step, cache, kv_len=kv_len)  # (B, 1, V)
        for b, (n, s) in enumerate(zip(lengths, seqs)):
            want = model(s[None, : n + step + 1])[0][0, -1]
            torch.testing.assert_close(logits[b, 0], want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_prefill_of_scattered_rows_in_one_call_equals_full_recompute():
    """`rows` batches equal-length chunks of sequences in non-adjacent cache rows, at
    different positions, in one call; rows it does not name keep their keys and values."""
    model = random_gpt(seed=4)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, CFG.vocab_size, (12,), generator=g) for _ in range(3)]
    cache = KVCache(CFG, 4)
    model.step(seqs[2][None, :6], torch.tensor([0]), cache, row0=3)  # row 3 holds 6 tokens
    model.step(seqs[0][None, :4], torch.tensor([0]), cache, row0=0)  # row 0 holds 4
    untouched = cache.k[:, 1].clone(), cache.v[:, 1].clone()
    idx = torch.stack([seqs[2][6:12], seqs[0][4:10]])  # (2, 6): a chunk for each
    last = model.step(idx, torch.tensor([6, 4]), cache, rows=torch.tensor([3, 0]), last_only=True)
    torch.testing.assert_close(last[0, -1], model(seqs[2][None, :12])[0][0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(last[1, -1], model(seqs[0][None, :10])[0][0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close((cache.k[:, 1], cache.v[:, 1]), untouched, atol=0, rtol=0)
    decode = model.step(seqs[0][None, 10:11], torch.tensor([10]), cache, row0=0)  # row0 path reads it back
    torch.testing.assert_close(decode[0, 0], model(seqs[0][None, :11])[0][0, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_rows_do_not_leak_into_each_other():
    """Rewriting one cache row (a new request in a freed slot) leaves the others' logits unchanged."""
    model = random_gpt(seed=3)
    a, b, c = (torch.randint(0, CFG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(3))
    cache = KVCache(CFG, 2)
    model.step(a, torch.tensor([0]), cache, row0=0)
    model.step(b, torch.tensor([0]), cache, row0=1)
    model.step(c[:, :3], torch.tensor([0]), cache, row0=1)  # row 1 reused for a shorter sequence
    nxt = torch.tensor([[1], [2]])
    logits = model.step(nxt, torch.tensor([8, 3]), cache)
    torch.testing.assert_close(logits[0, 0], model(torch.cat([a, nxt[:1]], 1))[0][0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, 0], model(torch.cat([c[:, :3], nxt[1:]], 1))[0][0, -1], atol=1e-5, rtol=0)


def test_kv_cache_bytes():
    cache = KVCache(CFG, 3, dtype=torch.bfloat16)
    assert cache.nbytes == KVCache.bytes_for(CFG, 3, torch.bfloat16) == 2 * 3 * 2 * 4 * 32 * 8 * 2


@torch.no_grad()
def test_a_half_precision_model_over_a_float32_cache_tracks_float32():
    """The engine's CPU layout: bfloat16 weights, float32 keys and values (attention in float32).
    Prefill and decode stay within bfloat16 noise of the float32 model, as they do over a
    bfloat16 cache, and the logits come out in the model's dtype."""
    model = random_gpt(seed=6)
    seq = torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(7))
    want = model(seq)[0][:, -1]
    half = random_gpt(seed=6).to(torch.bfloat16)
    for cache_dtype in (torch.bfloat16, torch.float32):
        cache = KVCache(CFG, 2, dtype=cache_dtype)
        half.step(seq[:, :9], torch.tensor([0, 0]), cache)
        got = half.step(seq[:, 9:], torch.tensor([9, 9]), cache)[:, 0]
        assert got.dtype == torch.bfloat16 and cache.k.dtype == cache_dtype
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


@torch.no_grad()
def test_step_parts_equals_the_same_steps_one_by_one():
    """A prompt chunk for rows 2-3 and a one-token decode of rows 0-1 in one pass over the
    weights give the logits and the cache that two step() calls give."""
    model = random_gpt(seed=8)
    g = torch.Generator().manual_seed(9)
    prompts = torch.randint(0, CFG.vocab_size, (4, 6), generator=g)
    caches = [KVCache(CFG, 4), KVCache(CFG, 4)]
    for cache in caches:  # rows 0-1 hold 5 tokens already
        model.step(prompts[:2, :5], torch.tensor([0, 0]), cache)
    chunk = StepPart(prompts[2:], torch.tensor([0, 0]), row0=2, logits=None)
    decode = StepPart(prompts[:2, 5:], torch.tensor([5, 5]))
    together = model.step_parts([chunk, decode], caches[0])
    assert together[0] is None
    apart = [model.step(prompts[2:], torch.tensor([0, 0]), caches[1], row0=2),
             model.step(prompts[:2, 5:], torch.tensor([5, 5]), caches[1])]
    torch.testing.assert_close(together[1], apart[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[0].v, caches[1].v, atol=1e-5, rtol=0)
