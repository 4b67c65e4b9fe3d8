"""The inference engine: iteration-level (continuous) batching over a static KV cache.

One worker thread owns the model, the KV cache and one `_State`. Each `step()`:

    admit waiting requests into free cache rows (lowest row first)
    -> prefill a budget of prompt tokens (equal-length chunks in one forward; see _prefill_budget)
    -> decode every running row in one batched forward, sample on the device
    -> emit tokens to the request streams and retire finished rows

The asyncio side only appends to the waiting queue (under a Condition, which also
wakes the idle worker) and receives results through `loop.call_soon_threadsafe`.

Cache rows: a request keeps one row of `block_size` positions for its whole life.
Free rows are handed out lowest first, so running rows cluster at the bottom and a
decode runs `GPT.step` over rows 0..n-1 (row0=0). Rows in that range that are free
or still prefilling ride along with a harmless write at a position that is free or
about to be overwritten by their next prefill chunk.

The public data types live in model/engine_types.py and the device fast paths (CUDA
graphs, CPU linear layers and decode attention) in model/fastpath.py; all of them are
importable from here.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from model.engine_types import (EngineConfig, EngineError, EngineStats, EngineStopped, GenerationResult,
                                Outbox, Overloaded, PromptTooLong, RequestHandle, TokenChunk)
from model.fastpath import DecodeGraphs, choose_cpu_attention, choose_cpu_linear, kv_cache_dtype
from model.generate import TextStream, context_window
from model.gpt import GPT, KVCache, StepPart
from model.sampling import BatchParams, SamplingParams, sample

__all__ = ["Engine", "EngineConfig", "EngineError", "EngineStats", "EngineStopped", "GenerationResult",
           "Overloaded", "PromptTooLong", "RequestHandle", "SamplingParams", "TokenChunk", "choose_cpu_linear"]

log = logging.getLogger(__name__)


# --- engine-side state --------------------------------------------------------

_request_ids = itertools.count()


@dataclass(eq=False)
class _Sequence:
    handle: RequestHandle
    params: SamplingParams
    seed: int
    tokens: list[int]  # prompt + generated: what a slide re-reads
    prompt_len: int
    stream: TextStream
    submitted: float
    row: int = -1
    n_cached: int = 0  # positions 0..n_cached-1 of the row hold this context
    pending: list[int] = field(default_factory=list)  # to feed next; exactly one = ready to decode
    generated: list[int] = field(default_factory=list)
    admitted: float = 0.0
    first_token: float | None = None
    uid: int = field(default_factory=lambda: next(_request_ids))  # unlike id(), never reused

    @property
    def decodable(self) -> bool:
        return len(self.pending) == 1


@dataclass
class _Chunk:
    """Prompt tokens prefilled together in one step: rows (sorted), each row's first position, its tokens."""
    rows: list[int]
    pos: list[int]
    ids: list[list[int]]  # all of one length


@dataclass
class _State:
    """Everything the scheduler owns. `waiting` and the flags are shared with submit()
    under Engine._cv; `rows` and `free` belong to the worker thread alone."""

    max_batch: int
    waiting: collections.deque = field(default_factory=collections.deque)
    rows: list = field(default_factory=list)  # cache row -> _Sequence | None
    free: list = field(default_factory=list)  # heap of free rows, lowest first
    stopping: bool = False
    drain: bool = True

    def __post_init__(self):
        self.rows = [None] * self.max_batch
        self.free = list(range(self.max_batch))

    def running(self) -> list[_Sequence]:
        return [s for s in self.rows if s is not None]


class Engine:
    def __init__(self, model: GPT, config: EngineConfig | None = None):
        self.model = model.eval()
        self.config = (config or EngineConfig()).validate()
        p = next(model.parameters())
        self._device, self._dtype = p.device, p.dtype
        self._cache_dtype = self._dtype  # decided in _setup, with the CPU kernels
        self._block_size = model.config.block_size
        self._n_vocab = model.tokenizer.n_vocab
        self._eot = model.tokenizer.eot_id
        self._cv = threading.Condition()
        self._state = _State(self.config.max_batch)
        self._rng = random.Random(self.config.seed if self.config.seed is not None else os.urandom(16))
        self._cache: KVCache | None = None
        self._graphs = DecodeGraphs()  # CUDA only; empty: eager decode
        self.cpu_linear: str | None = None  # on CPU, what choose_cpu_linear picked at start
        self.cpu_attention: str | None = None  # ... and choose_cpu_attention
        self._batch_key: tuple | None = None
        self._batch_params: BatchParams | None = None
        self._thread: threading.Thread | None = None
        self._ready = False
        self._total_steps = 0
        self._last_batch = 0
        self._tps = 0.0

    # --- properties -------------------------------------------------------
    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def ready(self) -> bool:
        return self._ready and self.alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> str:
        return str(self._dtype).removeprefix("torch.")

    @property
    def kv_cache_bytes(self) -> int:
        return KVCache.bytes_for(self.model.config, self.config.max_batch, self._cache_dtype)

    # --- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        """Allocate the cache, tune and warm up off the event loop, then start the worker."""
        if self._thread is not None:
            return
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        await asyncio.to_thread(self._setup)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        self._ready = True

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish the running and waiting ones first
        (for at most `timeout` seconds), then cancel whatever is left."""
        with self._cv:
            self._state.stopping, self._state.drain = True, drain
            self._cv.notify_all()
        self._ready = False
        if self._thread is None:
            return
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            with self._cv:
                self._state.drain = False
                self._cv.notify_all()
            await asyncio.to_thread(self._thread.join)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request (call from the event loop); see the module docstring for the flow."""
        params.validate()
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if len(prompt_ids) >= self._block_size:
            raise PromptTooLong(len(prompt_ids), self._block_size)
        if any(not 0 <= t < self._n_vocab for t in prompt_ids):
            raise ValueError(f"prompt_ids must be in [0, {self._n_vocab})")
        handle = RequestHandle(self, asyncio.get_running_loop())
        with self._cv:
            if self._state.stopping or not self.alive:
                raise EngineStopped("engine is stopped or draining")
            if len(self._state.waiting) >= self.config.max_queue:
                raise Overloaded(self._retry_after())
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            self._state.waiting.append(_Sequence(
                handle=handle, params=params, seed=seed, tokens=list(prompt_ids),
                prompt_len=len(prompt_ids), stream=TextStream(self.tokenizer, params.stop),
                submitted=time.perf_counter()))
            self._cv.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._cv:
            waiting = len(self._state.waiting)
        running = self._state.running()
        used = sum(s.n_cached + len(s.pending) for s in running)
        return EngineStats(
            running=len(running), waiting=waiting, max_batch=self.config.max_batch,
            kv_cache_bytes=self.kv_cache_bytes,
            kv_cache_usage=used / (self.config.max_batch * self._block_size),
            tokens_per_second=self._tps, total_steps=self._total_steps, last_batch_size=self._last_batch,
            block_size=self._block_size)

    def _retry_after(self) -> float:
        """Seconds until the queue has likely moved: queued work / measured throughput."""
        backlog = sum(s.params.max_new_tokens for s in self._state.waiting)
        return float(min(60.0, max(1.0, backlog / max(self._tps, 1.0))))

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # --- worker thread --------------------------------------------------------
    def _setup(self) -> None:
        """Runs once before the worker starts: layout, cache, warm-up / graph capture."""
        invariant = self.config.batch_invariant
        if self._device.type == "cpu":  # outside inference_mode: parameters must stay normal tensors
            with torch.no_grad():
                self.cpu_linear = choose_cpu_linear(self.model, self.config.cpu_linear, every_row=invariant)
                self.cpu_attention = choose_cpu_attention(self.model, self.config.cpu_attention, chunks=invariant)
        elif invariant:
            raise ValueError(f"batch-invariant mode runs on CPU only so far; this model is on {self._device}")
        self._cache_dtype = kv_cache_dtype(self.model)
        with torch.inference_mode():
            self._cache = KVCache(self.model.config, self.config.max_batch, self._device, self._cache_dtype)
            log.info("KV cache: %d rows x %d positions, %s, %.1f MiB", self.config.max_batch,
                     self._block_size, str(self._cache_dtype).removeprefix("torch."), self._cache.nbytes / 2**20)
            if self._device.type == "cuda" and self.config.cuda_graphs:
                self._graphs.capture(self.model, self._cache, self.config.batch_buckets, self.config.max_batch,
                                     self.config.prefill_chunk)
            # a prefill chunk, a decode and both samplers, so that the first request does not pay for
            # allocation, the BLAS's choice of kernels or CUDA's lazy loading of them (writes to row 0, free)
            zero = torch.zeros(1, dtype=torch.long, device=self._device)
            idx = torch.zeros(1, min(self.config.prefill_chunk, self._block_size - 1), dtype=torch.long,
                              device=self._device)
            self.model.step(idx, zero, self._cache)
            logits = self.model.step(idx[:, :1], zero + idx.shape[1], self._cache)
            for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9)):
                sample(logits[:, -1], BatchParams.build([params], [0], self._device), zero, self._n_vocab)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._has_work() and not self._state.stopping:
                        self._cv.wait()  # idle: sleep until submit/cancel/stop notifies
                    if self._state.stopping and (not self._state.drain or not self._has_work()):
                        break
                try:
                    self.step()
                except Exception as exc:  # a failed step fails its requests, not the engine
                    log.exception("engine step failed")
                    self._fail_running(f"{type(exc).__name__}: {exc}")
            self._cancel_everything()

    def _has_work(self) -> bool:
        return bool(self._state.waiting) or len(self._state.free) < self.config.max_batch

    def step(self) -> None:
        out = Outbox()
        try:
            self._admit_waiting(out)  # waiting requests take the lowest free cache rows
            prefill = self._plan_prefill()  # the step's budget of prompt tokens, as step batches
            rows, tokens = self._forward(prefill)  # prompt chunks + one token of every live row, sampled
            self._emit_and_retire(rows, tokens, out)  # push tokens to streams; free finished rows
        finally:  # even when a phase failed, what was finished before it gets delivered
            out.send()

    # --- the four phases ------------------------------------------------------
    def _admit_waiting(self, out: Outbox) -> None:
        """Retire cancelled rows, then move waiting requests into the lowest free rows."""
        st = self._state
        for seq in st.running():
            if seq.handle.cancelled:
                self._finish(seq, "cancelled", out)
        with self._cv:
            if any(s.handle.cancelled for s in st.waiting):
                for seq in [s for s in st.waiting if s.handle.cancelled]:
                    self._finish(seq, "cancelled", out)
                st.waiting = collections.deque(s for s in st.waiting if not s.handle.cancelled)
            while st.waiting and st.free:
                seq = st.waiting.popleft()
                seq.row = heapq.heappop(st.free)
                seq.pending, seq.n_cached = list(seq.tokens), 0
                seq.admitted = time.perf_counter()
                st.rows[seq.row] = seq

    def _plan_prefill(self) -> list[_Chunk]:
        """Choose the step's prompt tokens (`_prefill_budget`), oldest admission first, as step
        batches: rows given chunks of the same length share one. Only the oldest row may take
        a partial chunk: a sliver of a later prompt would split equal-length prompts into
        groups that no longer match. Each row's last pending token is left for the decode,
        which produces its logits. The rows' bookkeeping advances here; the returned batches
        still hold the chunks."""
        running = self._state.running()
        prefilling = sorted((s for s in running if len(s.pending) > 1), key=lambda s: s.admitted)
        budget = self._prefill_budget(len(prefilling), sum(s.decodable for s in running))
        groups: dict[int, list[_Sequence]] = collections.defaultdict(list)  # chunk length -> rows
        for seq in prefilling:
            n = min(budget, len(seq.pending) - 1)
            if n <= 0 or (groups and n < len(seq.pending) - 1):
                break
            groups[n].append(seq)
            budget -= n
        chunks = []
        for n, seqs in groups.items():
            seqs.sort(key=lambda s: s.row)
            chunks.append(_Chunk([s.row for s in seqs], [s.n_cached for s in seqs], [s.pending[:n] for s in seqs]))
            for seq in seqs:
                seq.n_cached += n
                del seq.pending[:n]
        return chunks

    def _prefill_budget(self, prefilling: int, decoding: int) -> int:
        """Prompt tokens this step may prefill: idle_prefill_chunk while no row decodes (nobody
        to stall); else prefill_chunk for each decoding row's worth of rows waiting on their
        prompts, up to idle_prefill_chunk. A step's prefill delays every decoding row's next
        token; it is worth a longer delay when it starts more rows than it delays. So clients
        that arrive a few milliseconds apart, just after the first began decoding, start
        together as they would have arriving at once, instead of a few per step behind a
        decode that soon carries them all (32 clients over HTTP took 145 steps for 128
        steps' worth of tokens with one prefill_chunk per step)."""
        top = max(self.config.prefill_chunk, self.config.idle_prefill_chunk)
        if not decoding:
            return top
        return min(top, self.config.prefill_chunk * max(1, prefilling // decoding))

    def _step_part(self, c: _Chunk) -> StepPart:
        """A chunk as GPT.step_parts' batch (no logits: the decode produces the last token's)."""
        contiguous = c.rows[-1] - c.rows[0] == len(c.rows) - 1  # rows are distinct and sorted
        return StepPart(idx=torch.tensor(c.ids, device=self._device), pos=torch.tensor(c.pos, device=self._device),
                        row0=c.rows[0], kv_len=max(c.pos) + len(c.ids[0]), logits=None,
                        rows=None if contiguous else torch.tensor(c.rows, device=self._device))

    def _forward(self, prefill: list[_Chunk]) -> tuple[list[int], list[int]]:
        """The step's forward: the prompt chunks, and one token for rows 0..n-1 (n = highest
        decodable row + 1), then sampling on the device. Eager, it is one pass over the
        weights for both; with CUDA graphs the chunks run first (a one-row chunk as a captured
        prefill where one fits it: eager, a chunk costs milliseconds of launches, and clients
        that arrive one by one bring one chunk per step) and the captured decode is replayed.
        Returns (decodable rows, their sampled tokens): the step's one host sync."""
        rows = [r for r, s in enumerate(self._state.rows) if s is not None and s.decodable]
        eager = []
        for c in prefill:
            if not (self._graphs and len(c.rows) == 1 and self._graphs.prefill(c.rows[0], c.pos[0], c.ids[0])):
                eager.append(self._step_part(c))
        prefill = eager
        if prefill and (not rows or self._graphs):  # no decode to share the pass, or a captured one
            self.model.step_parts(prefill, self._cache)
            prefill = []
        if not rows:
            self._last_batch = 0
            return [], []
        t0 = time.perf_counter()
        B = self._graphs.bucket(rows[-1] + 1)
        seqs = self._state.rows[:B] + [None] * (B - len(self._state.rows[:B]))
        # Rows riding along write where nothing lives: free rows at 0, prefilling rows at their
        # next prefill position (past this step's chunk, which _plan_prefill already counted).
        idx = [s.pending[0] if s is not None and s.decodable else 0 for s in seqs]
        pos = [s.n_cached if s is not None else 0 for s in seqs]
        steps = [len(s.generated) if s is not None else 0 for s in seqs]
        bp = self._sampling_params(seqs)
        if self._graphs:
            step = self._graphs.load(idx, pos, steps)
            logits = self._graphs.replay(B, max(pos) + 1)
        else:  # eager: the chunks, then the decode, in one pass over the weights
            decode = StepPart(torch.tensor(idx, device=self._device).unsqueeze(1),
                              torch.tensor(pos, device=self._device), kv_len=max(pos) + 1)
            step = torch.tensor(steps, device=self._device)
            logits = self.model.step_parts(prefill + [decode], self._cache)[-1]
        tokens = sample(logits[:, -1], bp, step, self._n_vocab).tolist()
        dt = time.perf_counter() - t0
        self._tps = 0.8 * self._tps + 0.2 * (len(rows) / dt) if self._tps else len(rows) / dt
        self._total_steps += 1
        self._last_batch = len(rows)
        return rows, [tokens[r] for r in rows]

    def _emit_and_retire(self, rows: list[int], tokens: list[int], out: Outbox) -> None:
        now = time.perf_counter()
        for r, token in zip(rows, tokens):
            seq = self._state.rows[r]
            seq.n_cached += 1  # the pending token's keys/values are in the cache now
            seq.pending = []
            if seq.first_token is None:
                seq.first_token = now
            if token == self._eot and seq.params.stop_at_eot:
                self._finish(seq, "eos", out)
                continue
            seq.tokens.append(token)
            seq.generated.append(token)
            out.put(seq.handle, TokenChunk([token], seq.stream.push([token])))
            if seq.stream.stopped:
                self._finish(seq, "stop", out)
            elif len(seq.generated) >= seq.params.max_new_tokens:
                self._finish(seq, "length", out)
            elif seq.n_cached == self._block_size:  # context full: slide (see context_window)
                seq.pending, seq.n_cached = context_window(seq.tokens, self._block_size), 0
            else:
                seq.pending = [token]

    # --- helpers ----------------------------------------------------------------
    def _finish(self, seq: _Sequence, reason: str, out: Outbox, error: str | None = None) -> None:
        tail = seq.stream.flush() if reason in ("length", "eos") else ""
        now = time.perf_counter()
        admitted = seq.admitted or now
        result = GenerationResult(
            token_ids=list(seq.generated), text=seq.stream.text, prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.generated), finish_reason=reason, queue_s=admitted - seq.submitted,
            ttft_s=None if seq.first_token is None else seq.first_token - seq.submitted,
            total_s=now - seq.submitted, error=error)
        out.put(seq.handle, TokenChunk([], tail) if tail else None, result)
        if seq.row >= 0:
            self._state.rows[seq.row] = None
            heapq.heappush(self._state.free, seq.row)
            seq.row = -1

    def _fail_running(self, error: str) -> None:
        out = Outbox()
        for seq in self._state.running():
            self._finish(seq, "error", out, error)
        out.send()

    def _cancel_everything(self) -> None:
        out = Outbox()
        for seq in self._state.running():
            self._finish(seq, "cancelled", out)
        with self._cv:
            while self._state.waiting:
                self._finish(self._state.waiting.popleft(), "cancelled", out)
        out.send()

    def _sampling_params(self, seqs: list) -> BatchParams:
        """Per-row sampling tensors, rebuilt only when the batch's membership changes."""
        key = tuple(s.uid if s is not None and s.decodable else None for s in seqs)
        if key != self._batch_key:
            live = [s if s is not None and s.decodable else None for s in seqs]
            self._batch_params = BatchParams.build(
                [s.params if s else None for s in live], [s.seed if s else 0 for s in live], self._device)
            self._batch_key = key
        return self._batch_params
