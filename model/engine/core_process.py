"""The engine-core process: it owns the model, the scheduler and the KV cache (an `Engine`
built with detokenize=False) and talks to the server process only through
model/engine/protocol.py's messages (vLLM V1's EngineCore process).

Its event loop does nothing but move messages: Submit/Cancel/Shutdown in, and after each
step one `Outputs` out. The engine's worker thread hands a step's results to the loop in one
call (request.Outbox); `_Core.collect` gathers them and schedules one flush, so the steps that
finish while the loop is busy leave in one merged message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import sys

import msgspec
import zmq
import zmq.asyncio

from model.engine.core import Engine
from model.engine.errors import EngineError, Overloaded
from model.engine.protocol import (Cancel, CoreSpec, Finish, FromCore, Hello, Outputs, Shutdown, Stats, Submit,
                                   ToCore, to_wire)
from model.engine.request import RequestHandle
from model.sampling import SamplingParams

log = logging.getLogger(__name__)


def main(spec: CoreSpec, to_core: str, from_core: str) -> None:
    """The process's entry point (multiprocessing, spawn): exit 0 after a Shutdown."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s engine-core %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(_serve(spec, to_core, from_core)))


async def _serve(spec: CoreSpec, to_core: str, from_core: str) -> int:
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(to_core)
    push_ctx = zmq.Context()  # a plain socket: sends never wait (see _Core.flush)
    push = push_ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(from_core)
    encoder = msgspec.msgpack.Encoder()
    try:
        engine = await asyncio.to_thread(_build_engine, spec)
        await engine.start()
    except Exception as e:  # reported to the client, which fails its start()
        log.exception("engine core failed to start")
        push.send(encoder.encode(Hello(error=f"{type(e).__name__}: {e}")))
        push.close(linger=5000)
        push_ctx.term()
        return 1
    push.send(encoder.encode(_hello(engine)))
    core = _Core(engine, push, encoder)
    _exit_with_parent(engine)
    try:
        await core.run(pull)
    finally:
        push.close(linger=5000)  # the last Outputs must reach the client before the process ends
        pull.close()
        ctx.term()
        push_ctx.term()
    return 0


def _build_engine(spec: CoreSpec) -> Engine:
    from model.checkpoint import load_model_from_checkpoint

    model = load_model_from_checkpoint(spec.checkpoint, device=spec.device, dtype=spec.dtype,
                                       tokenizer_path=spec.tokenizer_path, quantize=spec.quantize)
    # The client admits up to max_batch + max_queue live requests (model/engine/client.py); the core's
    # queue must take all of them, or a burst that arrives before a step admits the first is refused here.
    room = dataclasses.replace(spec.engine, max_queue=spec.engine.max_queue + spec.engine.max_batch)
    engine = Engine(model, room, detokenize=False)
    if spec.prepare is not None:
        import importlib

        module, _, name = spec.prepare[0].partition(":")
        getattr(importlib.import_module(module), name)(engine, **spec.prepare[1])
    return engine


def _hello(engine: Engine) -> Hello:
    info = getattr(engine.model, "checkpoint_info", None)
    return Hello(tokenizer=engine.tokenizer.spec(), block_size=engine.model.config.block_size,
                 n_vocab=engine.tokenizer.n_vocab, device=engine.device, dtype=engine.dtype,
                 kv_cache_bytes=engine.kv_cache_bytes, cpu_linear=engine.cpu_linear,
                 cpu_attention=engine.cpu_attention, checkpoint=dataclasses.asdict(info) if info else {})


def _exit_with_parent(engine: Engine) -> None:
    """The server process died without a Shutdown: nobody will read our outputs, so stop."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    loop = asyncio.get_running_loop()

    def orphaned() -> None:
        log.error("server process is gone; engine core exits")
        loop.remove_reader(parent.sentinel)
        engine.scheduler.stop(drain=False)
        loop.call_later(5.0, lambda: sys.exit(1))

    loop.add_reader(parent.sentinel, orphaned)


class _Sink(RequestHandle):
    """The core's side of a request: what the engine delivers goes into the next Outputs."""

    def __init__(self, core: "_Core", engine: Engine, rid: int, loop: asyncio.AbstractEventLoop):
        super().__init__(engine, loop)
        self.rid, self._core = rid, core
        self.sent_prompt = False  # its prompt logprobs (if it asked) have gone out

    def deliver(self, chunk, result) -> None:
        self._core.collect(self, chunk, result)


class _Core:
    def __init__(self, engine: Engine, push: zmq.Socket, encoder: msgspec.msgpack.Encoder):
        self.engine, self.push, self.encoder = engine, push, encoder
        self.handles: dict[int, _Sink] = {}
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list] = {}  # only requests that asked: Scored per token in tokens
        self.prompt_logprobs: dict[int, list] = {}  # ... and the prompt's, sent once
        self.finished: list[Finish] = []
        self._flush_due = False

    async def run(self, pull: zmq.asyncio.Socket) -> None:
        decoder = msgspec.msgpack.Decoder(ToCore)
        while True:
            msg = decoder.decode(await pull.recv())
            if isinstance(msg, Submit):
                self.submit(msg)
            elif isinstance(msg, Cancel):
                if (h := self.handles.get(msg.rid)) is not None:
                    h.cancel()
            elif isinstance(msg, Shutdown):
                await self.engine.stop(drain=msg.drain, timeout=msg.timeout)
                await asyncio.sleep(0)  # let the engine's last deliveries run
                self.flush()
                return

    def submit(self, msg: Submit) -> None:
        p = msg.params
        params = SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_k=p.top_k,
                                top_p=p.top_p, seed=p.seed, stop_at_eot=p.stop_at_eot, logprobs=p.logprobs,
                                prompt_logprobs=p.prompt_logprobs)
        sink = _Sink(self, self.engine, msg.rid, asyncio.get_running_loop())
        try:
            self.handles[msg.rid] = self.engine.submit(msg.prompt_ids, params, handle=sink)
        except Overloaded as e:  # the client admits no more than the core takes; kept for safety
            self._refuse(msg.rid, str(e), e.retry_after)
        except (EngineError, ValueError) as e:
            self._refuse(msg.rid, f"{type(e).__name__}: {e}", None)

    def _refuse(self, rid: int, error: str, retry_after: float | None) -> None:
        self.finished.append(Finish(rid, "error", 0.0, error, retry_after))
        self._schedule_flush()

    def collect(self, sink: _Sink, chunk, result) -> None:
        """One delivery from the engine (on this loop's thread, Outbox.send)."""
        rid = sink.rid
        if chunk is not None and chunk.token_ids:
            self.tokens.setdefault(rid, []).extend(chunk.token_ids)
            if chunk.logprobs is not None:
                self.logprobs.setdefault(rid, []).extend(map(to_wire, chunk.logprobs))
        prompt = chunk.prompt_logprobs if chunk is not None else None
        if result is not None and prompt is None and not sink.sent_prompt:
            prompt = result.prompt_logprobs  # it ended before a first token: only the result has them
        if prompt is not None and not sink.sent_prompt:
            sink.sent_prompt = True
            self.prompt_logprobs[rid] = list(map(to_wire, prompt))
        if result is not None:
            self.finished.append(Finish(rid, result.finish_reason, result.queue_s, result.error))
            self.handles.pop(rid, None)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what was collected as one Outputs. PUSH with no high-water mark queues rather
        than blocks, so a client that reads slowly never stalls the engine's steps."""
        self._flush_due = False
        s = self.engine.stats()
        msg: FromCore = Outputs(list(self.tokens.items()), self.finished,
                                Stats(s.running, s.waiting, s.kv_cache_usage, s.tokens_per_second, s.total_steps,
                                      s.last_batch_size), list(self.logprobs.items()),
                                list(self.prompt_logprobs.items()))
        self.tokens, self.finished, self.logprobs, self.prompt_logprobs = {}, [], {}, {}
        self.push.send(self.encoder.encode(msg))
