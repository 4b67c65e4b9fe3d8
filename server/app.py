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
import hashlib
import logging
import signal
from pathlib import Path

from aiohttp import web

from . import api_openai, api_seed, keys, openapi
from .auth import KeyStore
from .cache import MemoryCache, RedisCache, ResponseCache
from .config import ServerConfig
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
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(_engine_ctx(engine))
    app.on_response_prepare.append(echo_request_id)
    app.add_routes(api_seed.routes)
    app.add_routes(api_openai.routes)
    app.add_routes(openapi.routes)
    return app


async def redis_ctx(app: web.Application):
    """Redis (when REDIS_URL) and what uses it: rate limiter, response cache, generator."""
    config = app[keys.CONFIG]
    client = None
    if config.redis_url:
        import redis.asyncio as aioredis

        # Short timeouts: a slow Redis must degrade to uncached/in-memory, not stall requests.
        client = aioredis.from_url(config.redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
    app[keys.LIMITER] = RateLimiter(config.rate_limit, config.token_budget, client)
    backend = None
    if config.cache_ttl > 0:
        backend = RedisCache(client, config.cache_ttl) if client else MemoryCache(config.cache_ttl,
                                                                                   config.cache_max_entries)
    app[keys.CACHE] = ResponseCache(backend, digest="")
    app[keys.GENERATOR] = Generator(config, app[keys.LIFECYCLE], app[keys.METRICS], app[keys.LIMITER],
                                    app[keys.CACHE])
    yield
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
            engine = await asyncio.to_thread(load_engine, config)
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


def load_engine(config: ServerConfig):
    """Blocking: load the checkpoint and build (not start) the engine."""
    from model.checkpoint import load_model_from_checkpoint
    from model.engine import Engine, EngineConfig

    engine_config = EngineConfig(max_batch=config.max_batch, max_queue=config.max_queue,
                                 prefill_chunk=config.prefill_chunk, idle_prefill_chunk=config.idle_prefill_chunk,
                                 cpu_linear=config.cpu_linear, cpu_attention=config.cpu_attention,
                                 batch_invariant=config.batch_invariant)
    if config.engine_process:  # the core process loads the model; start() waits for it
        from model.engine.client import EngineClient
        from model.engine.protocol import CoreSpec

        return EngineClient(CoreSpec(checkpoint=config.model_checkpoint, device=config.device, dtype=config.dtype,
                                     tokenizer_path=config.tokenizer_path, engine=engine_config))
    model = load_model_from_checkpoint(config.model_checkpoint, device=config.device, dtype=config.dtype,
                                       tokenizer_path=config.tokenizer_path)
    return Engine(model, engine_config)


def model_info(engine, config: ServerConfig) -> ModelInfo:
    model = getattr(engine, "model", None)  # an EngineClient has no model, only what its core reported
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

async def serve(config: ServerConfig, engine=None) -> int:
    """Run until SIGTERM/SIGINT (exit code 0 after draining) or a model load failure (1)."""
    app = create_app(config, engine)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                           shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.info("listening", extra={"host": config.host, "port": runner.addresses[0][1]})

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
    log.info("draining", extra={"in_flight": lifecycle.inflight, "grace_s": config.drain_seconds})
    finished = await lifecycle.wait_idle(config.drain_seconds)
    if not finished:
        log.warning("drain grace period over; cancelling the rest", extra={"in_flight": lifecycle.inflight})
    await runner.cleanup()
    log.info("stopped", extra={"exit_code": code})
    return code
