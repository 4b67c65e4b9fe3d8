"""The inference engine: iteration-level (continuous) batching over a static KV cache.

One worker thread owns the model (through the runner) and the scheduler's rows. Each step
reads as vLLM's EngineCore.step:

    plan = self.scheduler.schedule(out)     # admit waiting requests, choose chunks and decode
    tokens = self.runner.execute(plan)      # the forward over the plan, sampled on the device
    self.scheduler.update(plan, tokens, out)  # push tokens to the streams, retire finished rows

With async scheduling (EngineConfig.async_scheduling) the update of a step waits until the
next one has been launched, so that the device never idles while the host reads tokens, pushes
them to the streams and plans: the scheduler's docstring says what that changes.

The asyncio side only queues requests (Scheduler.add, which also wakes the idle worker) and
receives results through `loop.call_soon_threadsafe` (request.Outbox).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import torch

from model.engine.config import EngineConfig
from model.engine.errors import EngineStopped, PromptTooLong
from model.engine.request import EngineStats, Outbox, RequestHandle
from model.engine.runner import Launched, ModelRunner
from model.engine.scheduler import Request, Scheduler, StepScores
from model.generate import TextStream
from model.gpt import GPT
from model.sampling import SamplingParams

log = logging.getLogger(__name__)


class TokensOnly:
    """TextStream's surface without the text: what a request streams when another process
    detokenizes and looks for stop strings (model/engine/client.py)."""

    text = ""
    stopped = False

    def push(self, ids) -> str:
        return ""

    def flush(self) -> str:
        return ""


class Engine:
    """Serves one model: `await start()`, `submit()` requests from the event loop, `await stop()`."""

    def __init__(self, model: GPT, config: EngineConfig | None = None, detokenize: bool = True):
        """`detokenize=False` (the engine-core process, model/engine/core_process.py): chunks
        carry token ids only and stop strings are not looked for; the client does both."""
        self.model = model.eval()
        self._detokenize = detokenize
        self.config = (config or EngineConfig()).validate()
        self._block_size = model.config.block_size
        self._n_vocab = model.tokenizer.n_vocab
        self.runner = ModelRunner(self.model, self.config)
        self.scheduler = Scheduler(self.config, self._block_size, model.tokenizer.eot_id, bucket=self.runner.bucket)
        self._thread: threading.Thread | None = None
        self._ready = False
        self._in_flight: Launched | None = None  # async scheduling: the step launched and not yet read

    # --- properties -------------------------------------------------------
    @property
    def block_size(self) -> int:
        """The model's context length: prompts must be shorter."""
        return self._block_size

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
        return str(self.runner.device)

    @property
    def dtype(self) -> str:
        return str(self.runner.dtype).removeprefix("torch.")

    @property
    def kv_cache_bytes(self) -> int:
        return self.runner.kv_cache_bytes

    @property
    def cpu_linear(self) -> str | None:
        """On CPU, what runs the linear layers (cpu_setup.choose_cpu_linear's choice at start)."""
        return self.runner.cpu_linear

    @property
    def cpu_attention(self) -> str | None:
        """On CPU, what runs one-token attention (cpu_setup.choose_cpu_attention's choice)."""
        return self.runner.cpu_attention

    # --- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        """Allocate the cache, tune and warm up off the event loop, then start the worker."""
        if self._thread is not None:
            return
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        await asyncio.to_thread(self.runner.setup)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        self._ready = True

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish the running and waiting ones first
        (for at most `timeout` seconds), then cancel whatever is left."""
        self.scheduler.stop(drain)
        self._ready = False
        if self._thread is None:
            return
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            self.scheduler.stop(drain=False)
            await asyncio.to_thread(self._thread.join)

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               handle: RequestHandle | None = None) -> RequestHandle:
        """Queue a request (call from the event loop); see the module docstring for the flow.
        `handle`: where its outputs go (the core process passes its own); by default a new one."""
        params.validate()
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if len(prompt_ids) >= self._block_size:
            raise PromptTooLong(len(prompt_ids), self._block_size)
        if any(not 0 <= t < self._n_vocab for t in prompt_ids):
            raise ValueError(f"prompt_ids must be in [0, {self._n_vocab})")
        if not self.alive:
            raise EngineStopped("engine is stopped or draining")
        handle = handle or RequestHandle(self, asyncio.get_running_loop())
        self.scheduler.add(Request(
            handle=handle, params=params, tokens=list(prompt_ids), prompt_len=len(prompt_ids),
            stream=TextStream(self.tokenizer, params.stop) if self._detokenize else TokensOnly(),
            submitted=time.perf_counter(),
            prompt_logprobs=None if params.prompt_logprobs is None else [None]),
            tokens_per_second=self.runner.tokens_per_second)
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Cancel a request (RequestHandle.cancel): its row is freed at the next step."""
        self.scheduler.cancel(handle)

    def stats(self) -> EngineStats:
        running, waiting, used = self.scheduler.occupancy()
        return EngineStats(
            running=running, waiting=waiting, max_batch=self.config.max_batch,
            kv_cache_bytes=self.kv_cache_bytes,
            kv_cache_usage=used / (self.config.max_batch * self._block_size),
            tokens_per_second=self.runner.tokens_per_second, total_steps=self.runner.total_steps,
            last_batch_size=self.runner.last_batch, block_size=self._block_size)

    # --- worker thread --------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while self.scheduler.wait_for_work():
                try:
                    self.step()
                except Exception as exc:  # a failed step fails its requests, not the engine
                    log.exception("engine step failed")
                    self._in_flight = None
                    self.scheduler.fail_running(f"{type(exc).__name__}: {exc}")
            self.scheduler.cancel_everything()

    def step(self) -> None:
        """One iteration: the scheduler plans, the runner launches, the scheduler folds the
        tokens back; with async scheduling, those of the step before, read while this one runs
        (a step that computes logprobs is folded back at once). Even when a phase fails, what
        was finished before it gets delivered."""
        out = Outbox()
        try:
            plan = self.scheduler.schedule(out)
            launched = self.runner.launch(plan, StepScores())  # scores stay empty unless some request asked
            previous, self._in_flight = self._in_flight, None
            if previous is not None:
                self.scheduler.update(previous.plan, self.runner.read(previous), out, previous.scores)
            if self.config.async_scheduling and not plan.scored:
                self._in_flight = launched
            else:
                self.scheduler.update(plan, self.runner.read(launched), out, launched.scores)
        finally:
            out.send()
