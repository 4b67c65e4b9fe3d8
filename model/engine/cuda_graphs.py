"""CUDA graphs of the engine's step, captured at start-up with static shapes.

`DecodeGraphs` captures `GPT.step` for one decode token (T == 1) at a few batch and
cache-length buckets (batch buckets only where the decode attends over each row's own length,
model/kernels/triton_decode.py), and replays the smallest that holds a step; likewise a one-row prompt
chunk at a few chunk lengths. model/gpt.py holds no graph code: the runner
(model/engine/runner.py) wraps the model's step from outside, as gpt-fast does.
"""

from __future__ import annotations

import logging

import torch

from model.gpt import GPT, KVCache, StepPart

log = logging.getLogger(__name__)


def kv_buckets(block_size: int, n: int = 4) -> list[int]:
    """Cache lengths that decode graphs are captured for: block_size and its halves, n in all
    (1024 -> 128, 256, 512, 1024). Attention reads the whole bucket, so a batch of short
    sequences should not read a full block's worth of keys at every step."""
    return sorted({max(block_size >> i, 1) for i in range(n)})


def chunk_buckets(prefill_chunk: int, block_size: int) -> list[int]:
    """Prompt-chunk lengths that one-row prefill graphs are captured for: 16, 32, ... up to
    the engine's chunk (at most block_size)."""
    top, t, out = min(prefill_chunk, block_size), 16, []
    while t < top:
        out.append(t)
        t *= 2
    return out + [top]


class DecodeGraphs:
    """CUDA graphs of the decode step, one per (batch bucket, cache-length bucket):
    (B, L) -> (graph, logits), and of a one-row prompt chunk per (chunk bucket, cache-length
    bucket). Every decode graph reads its inputs from one device buffer, filled from pinned
    memory by one asynchronous copy per step (`load`), so preparing a step never waits for
    the device (nor, with async scheduling, for the step in flight). Empty (falsy) on CPU or with graphs off: the engine runs eager."""

    def __init__(self):
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.prefills: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.batches: list[int] = []
        self.lengths: list[int] = []  # cache-length buckets of the prefill graphs
        self.decode_lengths: list[int] = []  # ... of the decode graphs
        self.sampling = False  # whether a fused sampler is captured after each decode
        self.chunks: list[int] = []
        self.block_size = 0

    def __bool__(self) -> bool:
        return bool(self.graphs)

    def bucket(self, n: int) -> int:
        """Round a batch of n rows up to the next captured size (n itself without graphs)."""
        if not self.graphs:
            return n
        return min(b for b in self.batches if b >= n)

    def load(self, idx: list[int], pos: list[int], steps: list[int], carried: list[int] | None = None,
             last: torch.Tensor | None = None) -> torch.Tensor:
        """Stage one decode's inputs (B = a captured bucket): token and position of each row,
        and each row's generation step, which is returned on the device for the sampler. Rows
        whose `carried` entry is 1 feed `last[row]` instead (their token of the step before, on
        the device: async scheduling). Two staging buffers in turn: with a step in flight the
        copy from the other one may not have run yet."""
        B = len(idx)
        staging = self._staging[self._loads % 2]
        self._loads += 1
        staging[:, :B] = torch.tensor([idx, pos, steps, carried or [0] * B], dtype=torch.long)
        self._inputs.copy_(staging, non_blocking=True)  # whole (contiguous): truly asynchronous
        if carried and any(carried):
            self._inputs[0, :B] = torch.where(self._inputs[3, :B].bool(), last[:B], self._inputs[0, :B])
        return self._inputs[2, :B]

    def replay(self, batch: int, kv_needed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, 1, V) of the loaded batch, reading the smallest captured cache length
        that holds kv_needed positions, and the tokens (B,) the captured sampler drew from them
        with the parameters of `set_sampling` (None without a captured sampler)."""
        L = min(L for L in self.decode_lengths if L >= kv_needed)
        g, (logits, tokens) = self.graphs[(batch, L)]
        g.replay()
        return logits, tokens

    def set_sampling(self, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     seed: torch.Tensor) -> None:
        """The captured sampler's per-row parameters (device tensors of one decode batch's rows),
        copied into its static buffers; they hold until the next call."""
        B = temperature.shape[0]
        self._temperature[:B].copy_(temperature)
        self._top_k[:B].copy_(top_k)
        self._top_p[:B].copy_(top_p)
        self._seed[:B].copy_(seed)

    def _length(self, kv_needed: int) -> int:
        """The smallest captured cache length that holds kv_needed positions."""
        return min(L for L in self.lengths if L >= kv_needed)

    def prefill_shape(self, n: int, pos: int) -> tuple[int, int] | None:
        """(chunk bucket, cache length) of the captured prefill for n tokens at pos, or None."""
        T = next((t for t in self.chunks if t >= n), None)
        if T is None or pos + T > self.block_size:  # padding must stay inside the block
            return None
        return T, self._length(pos + T)

    def prefill(self, row: int, pos: int, ids: list[int]) -> bool:
        """Write one row's prompt chunk into the cache by replaying a captured prefill, padded
        with token 0 to its bucket (the padding's keys and values land past the chunk, where
        the row writes again before it reads). False where none fits: run it eagerly."""
        shape = self.prefill_shape(len(ids), pos)
        if shape is None:
            return False
        T = shape[0]
        # from pageable memory: the copy has read its source when it returns, so nothing is reused too early
        self._prefill_inputs[:2 + T].copy_(torch.tensor([row, pos, *ids] + [0] * (T - len(ids))))
        self.prefills[shape].replay()
        return True

    def capture(self, model: GPT, cache: KVCache, buckets, max_batch: int, prefill_chunk: int,
                any_length: bool = False, sampler=None) -> None:
        """Capture GPT.step for T=1 at each batch and cache-length bucket, and a one-row
        prompt chunk at each chunk and cache-length bucket, with static shapes, each warmed
        up on a side stream first as CUDA graphs require. any_length: the model's decode
        reads no kv_len (each row attends over its own length), so one decode graph per
        batch bucket serves every length. sampler: a fused sampler (model/kernels/
        triton_sampling.sample's signature) captured after each decode, reading static per-row
        parameter buffers (set_sampling) and the loaded steps."""
        device, self.block_size = cache.k.device, model.config.block_size
        self.batches = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.lengths = kv_buckets(self.block_size)
        self.decode_lengths = [self.block_size] if any_length else self.lengths
        self.chunks = chunk_buckets(prefill_chunk, self.block_size)
        self._inputs = torch.zeros(4, max_batch, dtype=torch.long, device=device)  # idx, pos, steps, carried
        self._staging = [torch.zeros(4, max_batch, dtype=torch.long).pin_memory() for _ in range(2)]
        self._loads = 0
        self._prefill_inputs = torch.zeros(2 + self.chunks[-1], dtype=torch.long, device=device)
        self._pool = None
        self.sampling = sampler is not None
        self._temperature = torch.ones(max_batch, device=device)
        self._top_k = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._top_p = torch.ones(max_batch, device=device)
        self._seed = torch.zeros(max_batch, dtype=torch.long, device=device)
        n_vocab = model.tokenizer.n_vocab if sampler is not None else 0
        for B in reversed(self.batches):  # largest first, so smaller graphs reuse its memory pool
            idx, pos, steps = self._inputs[0, :B].view(B, 1), self._inputs[1, :B], self._inputs[2, :B]

            def decode(B=B, idx=idx, pos=pos, steps=steps, L=None):
                logits = model.step(idx, pos, cache, kv_len=L)
                tokens = None if sampler is None else sampler(
                    logits[:, -1], self._temperature[:B], self._top_k[:B], self._top_p[:B], self._seed[:B], steps,
                    n_vocab)
                return logits, tokens
            for L in reversed(self.decode_lengths):
                self.graphs[(B, L)] = self._capture(lambda: decode(L=L))
        row, pos = self._prefill_inputs[0:1], self._prefill_inputs[1:2]
        for T in self.chunks:
            idx = self._prefill_inputs[2:2 + T].view(1, T)
            for L in (L for L in self.lengths if L >= T):
                part = StepPart(idx, pos, kv_len=L, rows=row, logits=None)
                self.prefills[(T, L)] = self._capture(lambda: model.step_parts([part], cache))[0]
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s x cache lengths %s, and one-row prompt "
                 "chunks of %s tokens", self.batches, self.decode_lengths, self.chunks)

    def _capture(self, fn) -> tuple:
        """(graph, fn's output) with fn captured into the graphs' shared memory pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            out = fn()
        self._pool = g.pool()
        return g, out

