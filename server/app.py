"""The application factory and the process runner.

`create_app(config, engine=None)` builds the app (keys, middlewares, routes, cleanup
contexts) and does no I/O; tests drive it with aiohttp_client. `serve(config)` runs it:
listen at once, load the model in the background (/readyz false until warmed up), and
on SIGTERM drain: readiness false and new requests 503 at once, in-flight requests
finish within DRAIN_SECONDS, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import signal
import threading
from pathlib import Path

from aiohttp import web

from . import api_chat, api_openai, api_seed, api_tokenize, keys, openapi
from .auth import KeyStore
from .breaker import RedisBreaker
from .cache import MemoryCache, RedisCache, ResponseCache
from .chat_template import ChatTemplate
from .config import ServerConfig
from .connections import ConnectionGuard, ConnectionLimits, listen
from .errors import Draining
from .lifecycle import Lifecycle, ModelInfo
from .metrics import Metrics
from .middleware import access_middleware, auth_middleware, echo_request_id, error_middleware, generation_middleware
from .ratelimit import RateLimiter
from .serving import Generator

log = logging.getLogger(__name__)


def create_app(config: ServerConfig, engine=None) -> web.Application:
    """`engine`: a model.engine.Engine (started or not) to serve instead of loading MODEL_CHECKPOINT."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[access_middleware, error_middleware, auth_middleware, generation_middleware],
    )
    app[keys.CONFIG] = config
    app[keys.LIFECYCLE] = Lifecycle()
    app[keys.METRICS] = Metrics(model_name=Path(config.model_checkpoint).name or "model")
    app[keys.METRICS].queue_capacity.set(config.max_queue)
    app[keys.KEYS] = KeyStore(config.api_key, config.api_keys_file)
    app[keys.CHAT_TEMPLATE] = ChatTemplate.load(config.chat_template)  # ConfigError before listening
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(_engine_ctx(engine))
    app.on_response_prepare.append(echo_request_id)
    app.add_routes(api_seed.routes)
    app.add_routes(api_openai.routes)
    app.add_routes(api_chat.routes)
    app.add_routes(api_tokenize.routes)
    app.add_routes(openapi.routes)
    return app


async def redis_ctx(app: web.Application):
    """Redis (when REDIS_URL) and what uses it: rate limiter, response cache, generator."""
    config = app[keys.CONFIG]
    client = breaker = None
    if config.redis_url:
        import redis.asyncio as aioredis

        # Short timeouts: a slow Redis must degrade to uncached/in-memory, not stall requests.
        client = aioredis.from_url(config.redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
        breaker = RedisBreaker(client.ping, config.redis_retry_seconds)
    app[keys.LIMITER] = RateLimiter(config.rate_limit, config.token_budget, client, breaker=breaker)
    backend = None
    if config.cache_ttl > 0:
        backend = RedisCache(client, config.cache_ttl, breaker) if client else MemoryCache(config.cache_ttl,
                                                                                            config.cache_max_entries)
    app[keys.CACHE] = ResponseCache(backend, digest="")
    app[keys.GENERATOR] = Generator(config, app[keys.LIFECYCLE], app[keys.METRICS], app[keys.LIMITER],
                                    app[keys.CACHE])
    yield
    app[keys.GENERATOR].close()
    if breaker is not None:
        await breaker.close()
    if client is not None:
        await client.aclose()


def _engine_ctx(engine):
    # Neither this closure nor the lifecycle keeps the engine once the app has stopped: aiohttp
    # keeps every app it served in a module-level cache (up to 1024 middleware chains), and a
    # stopped app would keep the engine, model and KV cache alive with it, gigabytes per app in
    # a process that runs several (the benchmark, tests).
    given = [engine]

    async def engine_ctx(app: web.Application):
        lifecycle = app[keys.LIFECYCLE]
        metrics = app[keys.METRICS]
        metrics.watch_engine(lambda: lifecycle.engine.stats() if lifecycle.engine else None,
                             lambda: lifecycle.ready)
        task = asyncio.create_task(_load_and_start(app, given.pop()), name="load-model")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if lifecycle.engine is not None:
            await lifecycle.engine.stop(drain=True, timeout=app[keys.CONFIG].drain_seconds)
            lifecycle.engine = None  # see above

    return engine_ctx


async def _load_and_start(app: web.Application, engine) -> None:
    config, lifecycle = app[keys.CONFIG], app[keys.LIFECYCLE]
    try:
        if engine is None:
            engine = await in_daemon_thread(load_engine, config)
        lifecycle.engine = engine
        await engine.start()  # returns at once if already started
        info = model_info(engine, config)  # after start: an EngineClient learns it from its core
        lifecycle.model = info
        app[keys.METRICS].model_name = info.name
        app[keys.CACHE].digest = info.digest
        lifecycle.started = True
        log.info("model ready", extra={"model": info.name, "device": info.device, "dtype": info.dtype,
                                       "parameters": info.n_params, "digest": info.digest})
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a bad checkpoint: /healthz turns 503 and serve() exits 1
        lifecycle.load_error = f"{type(e).__name__}: {e}"
        log.error("model failed to load", extra={"error": lifecycle.load_error})
    finally:
        lifecycle.loaded.set()


async def in_daemon_thread(fn, *args):
    """`await fn(*args)` run in a daemon thread. asyncio.to_thread's executor threads are joined
    at exit, so a SIGTERM during a slow load waited for the load; a daemon thread is abandoned."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=run, name="load-model", daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # cancelled (SIGTERM): nobody waits for the model any more
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class KVCacheTooLarge(ValueError):
    """The model's KV cache for MAX_BATCH rows would exceed KV_CACHE_MAX_BYTES."""


def check_kv_budget(model_config, rows: int, element_size: int, budget: int) -> int:
    """Bytes of keys and values for `rows` sequences of block_size tokens; raises past `budget`."""
    need = 2 * model_config.n_layer * rows * model_config.block_size * model_config.n_embd * element_size
    if need > budget:
        raise KVCacheTooLarge(
            f"KV cache would need {need} bytes ({need / 2**30:.2f} GiB: block_size {model_config.block_size} x "
            f"MAX_BATCH {rows} rows x {model_config.n_layer} layers x n_embd {model_config.n_embd} x 2 x "
            f"{element_size} bytes), over KV_CACHE_MAX_BYTES={budget}; lower MAX_BATCH or raise the budget")
    return need


def load_engine(config: ServerConfig):
    """Blocking: load the checkpoint and build (not start) the engine."""
    from model.checkpoint import load_model_from_checkpoint
    from model.engine import Engine, EngineConfig

    engine_config = EngineConfig(max_batch=config.max_batch, max_queue=config.max_queue,
                                 prefill_chunk=config.prefill_chunk, idle_prefill_chunk=config.idle_prefill_chunk,
                                 cpu_linear=config.cpu_linear, cpu_attention=config.cpu_attention,
                                 batch_invariant=config.batch_invariant, cuda_kernels=config.cuda_kernels,
                                 async_scheduling=config.async_scheduling)
    if config.engine_process:  # the core process loads the model; start() waits for it
        from model.engine.client import EngineClient
        from model.engine.protocol import CoreSpec

        return EngineClient(CoreSpec(checkpoint=config.model_checkpoint, device=config.device, dtype=config.dtype,
                                     tokenizer_path=config.tokenizer_path, engine=engine_config,
                                     quantize=config.quantize))
    model = load_model_from_checkpoint(config.model_checkpoint, device=config.device, dtype=config.dtype,
                                       tokenizer_path=config.tokenizer_path,
                                       max_pickle_bytes=config.max_pickle_bytes, quantize=config.quantize)
    param = next(model.parameters())
    # On CPU the engine may keep float32 keys/values under half-precision weights.
    element_size = max(param.element_size(), 4) if param.device.type == "cpu" else param.element_size()
    check_kv_budget(model.config, config.max_batch, element_size, config.kv_cache_max_bytes)
    return Engine(model, engine_config)


def model_info(engine, config: ServerConfig) -> ModelInfo:
    info = _checkpoint_info(engine)
    names = config.served_model_name or (info.name,)
    # an EngineClient has no model, only what its core reported at start
    block_size = engine.block_size
    return dataclasses.replace(info, name=names[0], aliases=names[1:], max_model_len=block_size)


def _checkpoint_info(engine) -> ModelInfo:
    model = getattr(engine, "model", None)
    ci = getattr(engine, "checkpoint_info", None) or getattr(model, "checkpoint_info", None)
    if ci is not None:
        return ModelInfo(name=ci.name, digest=ci.digest, n_params=ci.n_params, path=str(ci.path),
                         format=ci.format, device=engine.device, dtype=engine.dtype)
    # An engine over a model built in memory (tests): digest the weights themselves.
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return ModelInfo(name="nanogpt", digest=h.hexdigest(), n_params=model.num_params(), path="<memory>",
                     format="memory", device=engine.device, dtype=engine.dtype)


# ---------------------------------------------------------------------- the process

CUT_ANSWER_S = 5.0  # after the grace period, how long cut requests get to send their 503 or error event


async def cut_in_flight(app: web.Application) -> None:
    """End what the drain could not finish with an answer: the engine cancels its requests, so
    plain requests answer 503 draining and streams send an error event and [DONE]; requests
    still waiting their turn get the 503 too. Only then does the runner close connections."""
    lifecycle = app[keys.LIFECYCLE]
    app[keys.GENERATOR].admission.fail_waiting(Draining("server shut down before this request's turn",
                                                        retry_after=1))
    if lifecycle.engine is not None:
        await lifecycle.engine.stop(drain=False)
    if not await lifecycle.wait_idle(CUT_ANSWER_S):
        log.warning("requests still open after the cut; closing their connections",
                    extra={"in_flight": lifecycle.inflight})


async def serve(config: ServerConfig, engine=None) -> int:
    """Run until SIGTERM/SIGINT (exit code 0 after draining) or a model load failure (1)."""
    app = create_app(config, engine)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                           shutdown_timeout=1.0)
    await runner.setup()
    guard = ConnectionGuard(ConnectionLimits.of(config), app[keys.METRICS])
    listener = await listen(runner, config.host, config.port, guard)
    log.info("listening", extra={"host": config.host, "port": listener.sockets[0].getsockname()[1],
                                 "max_connections": guard.max_connections})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lifecycle = app[keys.LIFECYCLE]

    async def load_failed() -> None:
        await lifecycle.loaded.wait()
        if lifecycle.load_error is None:
            await asyncio.Event().wait()  # loaded fine: never returns

    async def engine_failed() -> None:
        """An engine core process that dies: exit non-zero so the kubelet restarts the pod."""
        await lifecycle.loaded.wait()
        wait_failed = getattr(lifecycle.engine, "wait_failed", None)  # EngineClient only
        await (wait_failed() if wait_failed is not None else asyncio.Event().wait())

    failed = asyncio.create_task(engine_failed())
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(load_failed()), failed]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    code = 1 if lifecycle.load_error is not None or (failed.done() and not failed.cancelled()) else 0

    lifecycle.draining = True  # /readyz 503 and new generation requests 503, while still listening
    guard.cut_bodies(Draining("server is shutting down; retry on another replica", retry_after=1))
    log.info("draining", extra={"in_flight": lifecycle.inflight, "grace_s": config.drain_seconds})
    finished = await lifecycle.wait_idle(config.drain_seconds)
    if not finished:
        log.warning("drain grace period over; cancelling the rest", extra={"in_flight": lifecycle.inflight})
        await cut_in_flight(app)
    listener.close()
    await runner.cleanup()
    log.info("stopped", extra={"exit_code": code})
    return code
