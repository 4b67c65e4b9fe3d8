"""The inference engine: iteration-level (continuous) batching over a static KV cache.

One worker thread owns the model, the KV cache and one `_State`. Each `step()`:

    admit waiting requests into free cache rows (lowest row first)
    -> prefill at most `prefill_chunk` prompt tokens
    -> decode every running row in one batched forward, sample on the device
    -> emit tokens to the request streams and retire finished rows

The asyncio side only appends to the waiting queue (under a Condition, which also
wakes the idle worker) and receives results through `loop.call_soon_threadsafe`.

Cache rows: a request keeps one row of `block_size` positions for its whole life.
Free rows are handed out lowest first, so running rows cluster at the bottom and a
decode runs `GPT.step` over rows 0..n-1 (row0=0). Rows in that range that are free
or still prefilling ride along with a harmless write at a position that is free or
about to be overwritten by their next prefill chunk.
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
import torch.nn.functional as F

from model.generate import TextStream, context_window
from model.gpt import GPT, KVCache
from model.sampling import BatchParams, SamplingParams, sample

log = logging.getLogger(__name__)


# --- errors -----------------------------------------------------------------

class EngineError(Exception):
    """Base class of the engine's errors."""


class Overloaded(EngineError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"engine overloaded, retry after {retry_after:.1f}s")
        self.retry_after = retry_after


class PromptTooLong(EngineError, ValueError):
    """The prompt does not leave room for one new token in the model's context."""

    def __init__(self, n_tokens: int, limit: int):
        super().__init__(f"prompt has {n_tokens} tokens; the limit is {limit - 1} (block_size {limit})")
        self.n_tokens, self.limit = n_tokens, limit


class EngineStopped(EngineError):
    """The engine is draining or stopped and takes no new requests."""


# --- public data ------------------------------------------------------------

@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # cache rows = sequences decoded together
    max_queue: int = 256  # waiting requests beyond this are rejected with Overloaded
    prefill_chunk: int = 128  # prompt tokens prefilled per step, so a long prompt cannot stall decode
    cuda_graphs: bool = True  # capture the decode step per batch bucket (CUDA only)
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    seed: int | None = None  # seeds the engine's RNG that gives unseeded requests their seed
    # CPU weight layout for nn.Linear: "auto" times both at start and keeps the faster,
    # "out_in" is nn.Linear's own, "in_out" stores W^T contiguously (a transposed view).
    weight_layout: str = "auto"
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # CUDA-graph batch sizes

    def validate(self) -> "EngineConfig":
        for name in ("max_batch", "max_queue", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.weight_layout not in ("auto", "out_in", "in_out"):
            raise ValueError(f"weight_layout must be auto, out_in or in_out, got {self.weight_layout!r}")
        return self


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    max_batch: int
    kv_cache_bytes: int
    kv_cache_usage: float  # occupied positions / all positions, 0..1
    tokens_per_second: float  # recent decode throughput (all rows together)
    total_steps: int
    last_batch_size: int


@dataclass(frozen=True)
class TokenChunk:
    token_ids: list[int]
    text: str  # newly completed text; never contains (part of) a stop string


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    text: str  # the continuation only, cut before a stop string
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # length | stop | eos | cancelled | error
    queue_s: float
    ttft_s: float | None
    total_s: float
    error: str | None = None


class RequestHandle:
    """One request, seen from asyncio: iterate for TokenChunks, await result(), cancel()."""

    def __init__(self, engine: "Engine", loop: asyncio.AbstractEventLoop):
        self._engine, self._loop = engine, loop
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._result: asyncio.Future = loop.create_future()
        self.cancelled = False  # read by the worker thread

    def cancel(self) -> None:
        """Free the slot at the next engine step; idempotent, harmless after the end."""
        self.cancelled = True
        self._engine._wake()

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenChunk:
        chunk = await self._chunks.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def result(self) -> GenerationResult:
        return await asyncio.shield(self._result)

    # called on the event loop thread, via call_soon_threadsafe
    def _deliver(self, chunk: TokenChunk | None, result: GenerationResult | None) -> None:
        if chunk is not None:
            self._chunks.put_nowait(chunk)
        if result is not None:
            self._chunks.put_nowait(None)
            if not self._result.done():
                self._result.set_result(result)


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
        self._block_size = model.config.block_size
        self._n_vocab = model.tokenizer.n_vocab
        self._eot = model.tokenizer.eot_id
        self._cv = threading.Condition()
        self._state = _State(self.config.max_batch)
        self._rng = random.Random(self.config.seed if self.config.seed is not None else os.urandom(16))
        self._cache: KVCache | None = None
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph, idx, pos, logits)
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
        return KVCache.bytes_for(self.model.config, self.config.max_batch, self._dtype)

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
            tokens_per_second=self._tps, total_steps=self._total_steps, last_batch_size=self._last_batch)

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
        if self._device.type == "cpu":  # outside inference_mode: parameters must stay normal tensors
            with torch.no_grad():
                choose_weight_layout(self.model, self.config.weight_layout)
        with torch.inference_mode():
            self._cache = KVCache(self.model.config, self.config.max_batch, self._device, self._dtype)
            log.info("KV cache: %d rows x %d positions, %s, %.1f MiB", self.config.max_batch,
                     self._block_size, self.dtype, self._cache.nbytes / 2**20)
            if self._device.type == "cuda" and self.config.cuda_graphs:
                self._capture_graphs()
            else:  # one prefill and one decode, so first-request latency is not allocation
                idx = torch.zeros(1, 2, dtype=torch.long, device=self._device)
                self.model.step(idx, torch.zeros(1, dtype=torch.long, device=self._device), self._cache)

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
        out = _Outbox()
        try:
            self._admit_waiting(out)  # waiting requests take the lowest free cache rows
            self._prefill_chunk()  # at most prefill_chunk prompt tokens
            rows, tokens = self._decode_running()  # one batched forward + sampling for every live row
            self._emit_and_retire(rows, tokens, out)  # push tokens to streams; free finished rows
        finally:  # even when a phase failed, what was finished before it gets delivered
            out.send()

    # --- the four phases ------------------------------------------------------
    def _admit_waiting(self, out: "_Outbox") -> None:
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

    def _prefill_chunk(self) -> None:
        """Feed up to prefill_chunk prompt tokens, oldest admission first. Each row's last
        pending token is left for the batched decode, which produces its logits."""
        budget = self.config.prefill_chunk
        for seq in sorted((s for s in self._state.running() if len(s.pending) > 1), key=lambda s: s.admitted):
            n = min(budget, len(seq.pending) - 1)
            if n <= 0:
                break
            idx = torch.tensor([seq.pending[:n]], device=self._device)
            pos = torch.tensor([seq.n_cached], device=self._device)
            self.model.step(idx, pos, self._cache, row0=seq.row, kv_len=seq.n_cached + n, last_only=True)
            seq.n_cached += n
            del seq.pending[:n]
            budget -= n

    def _decode_running(self) -> tuple[list[int], list[int]]:
        """One forward for rows 0..n-1 (n = highest decodable row + 1), then sample on the
        device. Returns (decodable rows, their sampled tokens): the step's one host sync."""
        rows = [r for r, s in enumerate(self._state.rows) if s is not None and s.decodable]
        if not rows:
            self._last_batch = 0
            return [], []
        t0 = time.perf_counter()
        n = rows[-1] + 1
        B = self._bucket(n)
        seqs = self._state.rows[:B] + [None] * (B - len(self._state.rows[:B]))
        # free rows write at 0, prefilling rows at their next prefill position: both harmless
        idx = [[s.pending[0] if s is not None and s.decodable else 0] for s in seqs]
        pos = [s.n_cached if s is not None else 0 for s in seqs]
        logits = self._forward_decode(idx, pos)[:, -1]  # (B, V)
        bp = self._sampling_params(seqs)
        step = torch.tensor([len(s.generated) if s is not None else 0 for s in seqs], device=self._device)
        tokens = sample(logits, bp, step, self._n_vocab).tolist()
        dt = time.perf_counter() - t0
        self._tps = 0.8 * self._tps + 0.2 * (len(rows) / dt) if self._tps else len(rows) / dt
        self._total_steps += 1
        self._last_batch = len(rows)
        return rows, [tokens[r] for r in rows]

    def _emit_and_retire(self, rows: list[int], tokens: list[int], out: "_Outbox") -> None:
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
    def _finish(self, seq: _Sequence, reason: str, out: "_Outbox", error: str | None = None) -> None:
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
        out = _Outbox()
        for seq in self._state.running():
            self._finish(seq, "error", out, error)
        out.send()

    def _cancel_everything(self) -> None:
        out = _Outbox()
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

    def _bucket(self, n: int) -> int:
        """CUDA graphs exist for a few batch sizes; round up to the next one."""
        if not self._graphs:
            return n
        return min(b for b in self._graphs if b >= n)

    def _forward_decode(self, idx: list, pos: list) -> torch.Tensor:
        graph = self._graphs.get(len(idx))
        if graph is None:  # eager: attend only over the positions in use
            idx_t = torch.tensor(idx, device=self._device)
            pos_t = torch.tensor(pos, device=self._device)
            return self.model.step(idx_t, pos_t, self._cache, kv_len=max(pos) + 1)
        g, idx_s, pos_s, logits_s = graph
        idx_s.copy_(torch.tensor(idx), non_blocking=True)
        pos_s.copy_(torch.tensor(pos), non_blocking=True)
        g.replay()
        return logits_s

    def _capture_graphs(self) -> None:
        """Capture GPT.step for T=1 at each batch bucket with static shapes (kv_len =
        block_size), warmed up on a side stream first as CUDA graphs require."""
        buckets = sorted({b for b in self.config.batch_buckets if b < self.config.max_batch}
                         | {self.config.max_batch})
        pool = None
        for B in reversed(buckets):  # largest first, so smaller graphs reuse its memory pool
            idx = torch.zeros(B, 1, dtype=torch.long, device=self._device)
            pos = torch.zeros(B, dtype=torch.long, device=self._device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model.step(idx, pos, self._cache, kv_len=self._block_size)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                logits = self.model.step(idx, pos, self._cache, kv_len=self._block_size)
            pool = g.pool()
            self._graphs[B] = (g, idx, pos, logits)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", buckets)


class _Outbox:
    """Deliveries collected during a step, sent with one call_soon_threadsafe per event loop."""

    def __init__(self):
        self._by_loop: dict = collections.defaultdict(list)

    def put(self, handle: RequestHandle, chunk: TokenChunk | None, result: GenerationResult | None = None):
        self._by_loop[handle._loop].append((handle, chunk, result))

    def send(self) -> None:
        for loop, items in self._by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver_all(items) -> None:
    for handle, chunk, result in items:
        handle._deliver(chunk, result)


# --- CPU weight layout ---------------------------------------------------------

def choose_weight_layout(model: GPT, layout: str = "auto") -> str:
    """Store each nn.Linear weight as [out, in] (nn.Linear's layout) or as a transposed
    view of contiguous [in, out] storage. Both are the same Parameter values, so
    forward(), state_dict() and weight tying are unchanged; only which BLAS kernel
    F.linear reaches differs, and at batch 1 on CPU that decides the speed (float32
    runs faster on [in, out]; float16 collapses on it). "auto" times both on the
    model's largest matrices and returns the layout it chose."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if layout == "auto":
        layout = _fastest_layout([model.lm_head.weight, model.transformer.h[0].mlp.c_fc.weight])
    for m in linears:
        w = m.weight
        is_in_out = w.stride() == (1, w.shape[0])
        if layout == "in_out" and not is_in_out:
            w.data = w.data.t().contiguous().t()
        elif layout == "out_in" and not w.is_contiguous():
            w.data = w.data.contiguous()
    log.info("CPU weight layout: %s", layout)
    return layout


def _fastest_layout(weights: list[torch.Tensor], repeats: int = 5) -> str:
    def best_time(ws):
        x = [torch.randn(1, 1, w.shape[1], dtype=w.dtype) for w in ws]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for xi, w in zip(x, ws):
                F.linear(xi, w)
            times.append(time.perf_counter() - t0)
        return min(times)

    out_in = [w.contiguous() for w in weights]
    in_out = [w.t().contiguous().t() for w in weights]
    best_time(out_in), best_time(in_out)  # warm-up
    return "in_out" if best_time(in_out) < best_time(out_in) else "out_in"
