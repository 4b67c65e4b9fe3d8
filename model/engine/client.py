"""EngineClient: the `Engine` surface (start/stop, submit/cancel, stats, RequestHandle
streams) over an engine core in a process of its own (model/engine/core_process.py).

The server's event loop and the engine's step loop then hold different interpreter locks.
The client does what needs text: it detokenizes each request's new token ids and looks for
stop strings (a hit cancels the request in the core; the tokens the core sampled after it
are dropped, so the result equals in-process). It admits no more requests than the core's
rows and queue hold, so Overloaded is raised at submit() as in-process.

The core dying is noticed at once (its process sentinel): every live request fails, `alive`
turns False (/healthz 503) and `wait_failed()` returns, on which the server exits non-zero.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from model.engine import core_process
from model.engine.errors import EngineError, EngineStopped, Overloaded, PromptTooLong
from model.engine.protocol import (Cancel, CoreSpec, Finish, FromCore, Hello, Outputs, Params, Shutdown, Submit,
                                   from_wire)
from model.engine.request import EngineStats, GenerationResult, RequestHandle, TokenChunk
from model.generate import TextStream
from model.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Live:
    """A request the core has not finished yet, as the client tracks it."""
    handle: RequestHandle
    stream: TextStream
    prompt_len: int
    max_new_tokens: int
    submitted: float
    token_ids: list[int] = field(default_factory=list)
    first_token: float | None = None
    stopped: bool = False  # a stop string was hit; the core has been told to cancel
    logprobs: list | None = None  # TokenLogprob per token in token_ids, when the request asked
    prompt_logprobs: tuple | None = None  # ... and the prompt's, once the core has sent them


class EngineClient:
    """Serves one model through an engine-core process: `await start()`, `submit()`, `await stop()`."""

    def __init__(self, spec: CoreSpec):
        self.spec = spec
        self.config = spec.engine.validate()
        self._hello: Hello | None = None
        self.tokenizer = None
        self.checkpoint_info = None
        self._proc = None
        self._live: dict[int, _Live] = {}
        self._rids = itertools.count()
        self._stats = None
        self._stopping = False
        self._failure: str | None = None
        self._failed: asyncio.Event | None = None
        self._reader: asyncio.Task | None = None

    # --- what the server reads ------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._hello is not None and not self._stopping and self.alive

    @property
    def block_size(self) -> int | None:
        """The model's context length, once the core has said hello."""
        return self._hello.block_size if self._hello is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._failure is None and self._proc.is_alive()

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    device = property(lambda self: self._hello.device if self._hello else "unknown")
    dtype = property(lambda self: self._hello.dtype if self._hello else "unknown")
    kv_cache_bytes = property(lambda self: self._hello.kv_cache_bytes if self._hello else 0)
    cpu_linear = property(lambda self: self._hello.cpu_linear if self._hello else None)
    cpu_attention = property(lambda self: self._hello.cpu_attention if self._hello else None)

    def stats(self) -> EngineStats:
        s = self._stats
        return EngineStats(
            running=s.running if s else 0, waiting=s.waiting if s else 0, max_batch=self.config.max_batch,
            kv_cache_bytes=self.kv_cache_bytes, kv_cache_usage=s.kv_cache_usage if s else 0.0,
            tokens_per_second=s.tokens_per_second if s else 0.0, total_steps=s.total_steps if s else 0,
            last_batch_size=s.last_batch_size if s else 0, block_size=self.block_size or 0)

    async def wait_failed(self) -> str:
        """Return (the reason) once the core has died while serving; never after a clean stop."""
        await self._failed.wait()
        return self._failure

    # --- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        """Start the core process and wait until it has loaded and warmed up the model.
        Raises EngineError with the core's reason when it fails to start."""
        if self._proc is not None:
            return
        self._failed = asyncio.Event()
        self._dir = tempfile.mkdtemp(prefix="nanogpt-core-")  # mode 0700: only this user connects
        self._ctx = zmq.asyncio.Context()
        self._push, self._pull = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        self._push.bind(f"ipc://{self._dir}/to-core")
        self._pull.bind(f"ipc://{self._dir}/from-core")
        self._send_sock = zmq.Socket.shadow(self._push.underlying)
        self._encoder, self._decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromCore)
        self._proc = multiprocessing.get_context("spawn").Process(
            target=core_process.main, name="engine-core", daemon=True,
            args=(self.spec, f"ipc://{self._dir}/to-core", f"ipc://{self._dir}/from-core"))
        await asyncio.to_thread(self._proc.start)
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(self._proc.sentinel, lambda: exited.done() or exited.set_result(None))
        first = asyncio.ensure_future(self._pull.recv())
        await asyncio.wait([first, exited], return_when=asyncio.FIRST_COMPLETED)
        loop.remove_reader(self._proc.sentinel)
        hello = self._decoder.decode(first.result()) if first.done() else None
        if not isinstance(hello, Hello) or hello.error is not None:
            first.cancel()
            await asyncio.to_thread(self._proc.join, 10)
            reason = hello.error if isinstance(hello, Hello) else f"exit code {self._proc.exitcode}"
            self._close()
            raise EngineError(f"engine core failed to start: {reason}")
        self._accept_hello(hello)
        loop.add_reader(self._proc.sentinel, self._on_exit)
        self._reader = asyncio.create_task(self._read(), name="engine-client-reader")

    def _accept_hello(self, hello: Hello) -> None:
        from model.checkpoint import CheckpointInfo
        from model.tokenizer import load_tokenizer_from_spec

        self.tokenizer = load_tokenizer_from_spec(hello.tokenizer, self.spec.tokenizer_path)
        self.checkpoint_info = CheckpointInfo(**hello.checkpoint) if hello.checkpoint else None
        self._hello = hello

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; the core finishes (drain) or cancels what it holds, sends its
        last outputs and exits. A core that does not exit in time is killed."""
        if self._proc is None or self._stopping:
            return
        self._stopping = True
        asyncio.get_running_loop().remove_reader(self._proc.sentinel)
        if self._failure is None and self._proc.is_alive():
            self._send(Shutdown(drain=drain, timeout=timeout))
            await asyncio.to_thread(self._proc.join, None if timeout is None else timeout + 30)
        if self._proc.is_alive():
            log.error("engine core did not exit; killing it")
            self._proc.kill()
            await asyncio.to_thread(self._proc.join)
        self._drain_socket()
        if self._reader is not None:
            self._reader.cancel()
        self._fail_live("cancelled", None)
        self._close()

    def _close(self) -> None:
        self._push.close(linger=0)
        self._pull.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _on_exit(self) -> None:
        """The core's process sentinel fired while serving: it died."""
        asyncio.get_running_loop().remove_reader(self._proc.sentinel)
        self._proc.join(1)
        self._failure = f"engine core process exited unexpectedly (exit code {self._proc.exitcode})"
        log.error(self._failure)
        self._drain_socket()
        self._fail_live("error", self._failure)
        self._failed.set()

    # --- requests ---------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request (call from the event loop); the same checks and errors as Engine.submit."""
        params.validate()
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        hello = self._hello
        if hello is not None and len(prompt_ids) >= hello.block_size:
            raise PromptTooLong(len(prompt_ids), hello.block_size)
        if hello is not None and any(not 0 <= t < hello.n_vocab for t in prompt_ids):
            raise ValueError(f"prompt_ids must be in [0, {hello.n_vocab})")
        if not self.ready:
            raise EngineStopped("engine is stopped or draining")
        if len(self._live) >= self.config.max_batch + self.config.max_queue:
            raise Overloaded(self._retry_after())
        handle = RequestHandle(self, asyncio.get_running_loop())
        handle.rid = next(self._rids)
        self._live[handle.rid] = _Live(handle, TextStream(self.tokenizer, params.stop), len(prompt_ids),
                                       params.max_new_tokens, time.perf_counter(),
                                       logprobs=None if params.logprobs is None else [])
        self._send(Submit(handle.rid, list(prompt_ids), Params(
            params.max_new_tokens, params.temperature, params.top_k, params.top_p, params.seed, params.stop_at_eot,
            params.logprobs, params.prompt_logprobs)))
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Cancel a request (RequestHandle.cancel): the core frees its row at its next step."""
        handle.cancelled = True
        if handle.rid in self._live and self.alive and not self._stopping:
            self._send(Cancel(handle.rid))

    def _retry_after(self) -> float:
        """As the scheduler's: the queued work over the measured throughput."""
        backlog = sum(v.max_new_tokens for v in self._live.values())
        return float(min(60.0, max(1.0, backlog / max(self.stats().tokens_per_second, 1.0))))

    def _send(self, msg) -> None:
        self._send_sock.send(self._encoder.encode(msg))

    # --- outputs ----------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            self._apply(self._decoder.decode(await self._pull.recv()))

    def _drain_socket(self) -> None:
        """Apply what the core sent before it exited and the reader has not read yet."""
        sock = zmq.Socket.shadow(self._pull.underlying)
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._apply(self._decoder.decode(data))

    def _apply(self, msg: FromCore) -> None:
        if not isinstance(msg, Outputs):
            return
        now = time.perf_counter()
        scored, prompts = dict(msg.logprobs), dict(msg.prompt_logprobs)
        for rid, entries in prompts.items():
            if (live := self._live.get(rid)) is not None:
                live.prompt_logprobs = tuple(map(from_wire, entries))
        for rid, ids in msg.tokens:
            if (live := self._live.get(rid)) is not None and not live.stopped:
                self._on_tokens(rid, live, ids, now, scored.get(rid), rid in prompts)
        for fin in msg.finished:
            if (live := self._live.pop(fin.rid, None)) is not None:
                self._on_finish(live, fin, now)
        self._stats = msg.stats

    def _on_tokens(self, rid: int, live: _Live, ids: list[int], now: float, scored: list | None,
                   first: bool) -> None:
        """New tokens of one request, possibly several steps' worth merged: detokenize them
        one by one, so that a stop string ends the request at the token that completed it.
        scored: their logprobs, if it asked; first: the prompt's came with them."""
        if live.first_token is None:
            live.first_token = now
        kept, text = [], ""
        for token in ids:
            kept.append(token)
            text += live.stream.push([token])
            if live.stream.stopped:
                live.stopped = True
                self._send(Cancel(rid))  # the core's Finish (cancelled) ends the request
                break
        live.token_ids.extend(kept)
        logprobs = None
        if scored is not None and live.logprobs is not None:
            logprobs = tuple(map(from_wire, scored[:len(kept)]))
            live.logprobs.extend(logprobs)
        live.handle.deliver(TokenChunk(kept, text, logprobs, live.prompt_logprobs if first else None), None)

    def _on_finish(self, live: _Live, fin: Finish, now: float) -> None:
        reason = "stop" if live.stopped else fin.reason
        error = fin.error
        if fin.retry_after is not None:
            error = f"engine core overloaded: {fin.error}"
        tail = live.stream.flush() if reason in ("length", "eos") else ""
        live.handle.deliver(TokenChunk([], tail) if tail else None, GenerationResult(
            token_ids=list(live.token_ids), text=live.stream.text, prompt_tokens=live.prompt_len,
            completion_tokens=len(live.token_ids), finish_reason=reason, queue_s=fin.queue_s,
            ttft_s=None if live.first_token is None else live.first_token - live.submitted,
            total_s=now - live.submitted, error=error,
            logprobs=None if live.logprobs is None else tuple(live.logprobs), prompt_logprobs=live.prompt_logprobs))

    def _fail_live(self, reason: str, error: str | None) -> None:
        now = time.perf_counter()
        for rid in list(self._live):
            self._on_finish(self._live.pop(rid), Finish(rid, reason, 0.0, error), now)
