"""Text generation for one prompt: the seed's `generate_text`, on the KV cache.

It uses the same pieces as the batching engine (`sampling.sample`, `context_window`,
`TextStream`, and the same prefill-then-decode order), so for a given seed
`generate_text` and the engine produce the same tokens.
"""

from __future__ import annotations

import codecs
from typing import Iterator, Sequence

import torch

from model.gpt import GPT, KVCache, kv_cache_dtype
from model.sampling import BatchParams, SamplingParams, sample


def context_window(ids: Sequence[int], block_size: int) -> list[int]:
    """The sliding-window policy, shared with the engine.

    A sequence is decoded on the KV cache while it fits in `block_size` positions, so
    within `block_size` the output equals full recomputation. When the cache is full
    (or a prompt is longer than `block_size`), the context restarts from the last
    `block_size // 2` tokens, which are prefilled again from position 0 before decoding
    goes on. Halving (rather than sliding by one token, as nanoGPT's full recompute does)
    makes the re-prefill cost amortise over block_size // 2 new tokens.
    """
    if len(ids) <= block_size:
        return list(ids)
    return list(ids[-max(1, block_size // 2):])


class TextStream:
    """Turns token ids into text deltas that are safe to show.

    It holds back incomplete UTF-8 bytes, and any tail of the text that could be the
    start of a stop string; when a stop string appears, the text is cut before it and
    `stopped` becomes True. Text that was emitted never contains a stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._held = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        """Add tokens; return the newly releasable text."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(self._bytes(ids))
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: release whatever is held (unless a stop string cut it)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _bytes(self, ids: Sequence[int]) -> bytes:
        decode_bytes = getattr(self._tokenizer, "decode_bytes", None)
        return decode_bytes(list(ids)) if decode_bytes else self._tokenizer.decode(list(ids)).encode()

    def _release(self, final: bool) -> str:
        held, cut = self._held, len(self._held)
        hits = [i for i in (held.find(s) for s in self._stop) if i >= 0]
        if hits:
            cut, self.stopped = min(hits), True
        elif not final:
            # keep back the longest tail that is a proper prefix of some stop string
            for s in self._stop:
                for n in range(min(len(s) - 1, len(held)), 0, -1):
                    if held.endswith(s[:n]):
                        cut = min(cut, len(held) - n)
                        break
        out, self._held = held[:cut], ("" if self.stopped else held[cut:])
        self.text += out
        return out


@torch.inference_mode()
def generate_ids(model: GPT, prompt_ids: Sequence[int], params: SamplingParams, seed: int,
                 n_vocab: int) -> Iterator[int]:
    """Yield up to params.max_new_tokens sampled ids (the caller decides when to stop early).

    Order of work per token, as in the engine: the context's tokens but the last are
    prefilled into the cache, the last one is decoded alone, and its logits are sampled
    with noise counter `step` = tokens generated so far.
    """
    p = next(model.parameters())
    block_size = model.config.block_size
    cache = KVCache(model.config, 1, device=p.device, dtype=kv_cache_dtype(model))  # as the engine's
    bp = BatchParams.build([params], [seed], p.device)
    tokens = list(prompt_ids)
    pending, n_cached = context_window(tokens, block_size), 0
    for step in range(params.max_new_tokens):
        if len(pending) > 1:  # prefill
            idx = torch.tensor([pending[:-1]], device=p.device)
            model.step(idx, torch.tensor([n_cached], device=p.device), cache, last_only=True)
            n_cached += len(pending) - 1
        idx = torch.tensor([pending[-1:]], device=p.device)
        logits = model.step(idx, torch.tensor([n_cached], device=p.device), cache)  # (1, 1, V)
        n_cached += 1
        token = int(sample(logits[:, -1], bp, torch.tensor([step], device=p.device), n_vocab))
        yield token
        tokens.append(token)
        if n_cached == block_size:  # the cache is full: slide
            pending, n_cached = context_window(tokens, block_size), 0
        else:
            pending = [token]


def generate_text(model: GPT, prompt: str, max_length: int = 200, temperature: float = 0.8,
                  top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
                  stop: Sequence[str] | None = None) -> str:
    """Return `prompt` followed by up to `max_length` new tokens of continuation.

    temperature 0 or top_k 1 is greedy. A seed gives the same text every time (and the
    same text as the serving engine); without one, a seed is drawn from torch's global
    generator, so `torch.manual_seed` makes runs repeatable as in nanoGPT. Generation
    stops at the tokenizer's end-of-text token (not included) and at the first stop
    string (the text is cut before it). Beyond block_size see `context_window`.
    """
    tokenizer = model.tokenizer
    if isinstance(stop, str):
        stop = (stop,)
    params = SamplingParams(max_new_tokens=max_length, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop=tuple(stop or ())).validate()
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        if tokenizer.eot_id is None:
            raise ValueError("prompt must not be empty for a tokenizer without an end-of-text token")
        prompt_ids = [tokenizer.eot_id]  # GPT-2 convention: condition on <|endoftext|>
    stream = TextStream(tokenizer, params.stop)
    for token in generate_ids(model, prompt_ids, params, seed, tokenizer.n_vocab):
        if token == tokenizer.eot_id and params.stop_at_eot:
            break
        stream.push([token])
        if stream.stopped:
            break
    stream.flush()
    return prompt + stream.text
