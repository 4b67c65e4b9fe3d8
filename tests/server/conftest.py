"""Fixtures for the server tests: a tiny char-level model exported to disk (so it loads
through load_model_from_checkpoint exactly as in production), the real Engine over it,
apps driven by aiohttp's test server, real server processes, and a real redis-server."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import load_model_from_checkpoint
from model.engine import Engine
from model.export import save_export
from model.gpt import GPT, GPTConfig
from server import create_app
from server.config import ServerConfig
from server_helpers import ENGINE_CONFIG, free_port, wait_for, wait_for_sync

REPO = Path(__file__).resolve().parents[2]
# Printable ASCII plus newline: schemathesis's random prompts mostly encode; the rest are 400s.
ITOS = ["\n"] + [chr(c) for c in range(32, 127)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random 2-layer char model in the project's export format (the demo model's format)."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=128, vocab_size=len(ITOS), n_layer=2, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-char"
    save_export(GPT(cfg), path, {"kind": "char", "itos": ITOS}, {"origin": "tests/server"})
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model_from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")




@pytest.fixture
def engine_mode(request) -> str:
    """"in_process" (Engine) unless a module parametrizes it (indirect) with "remote": the
    engine core in a process of its own behind model/engine/client.EngineClient; or "async": the
    in-process Engine with async scheduling (model/engine/core.py)."""
    return getattr(request, "param", "in_process")


@pytest.fixture
def make_engine(tiny_model, tiny_checkpoint, engine_mode):
    def make(**changes):
        from dataclasses import replace

        if engine_mode == "remote":
            from model.engine.client import EngineClient
            from model.engine.protocol import CoreSpec

            return EngineClient(CoreSpec(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32",
                                         engine=replace(ENGINE_CONFIG, **changes)))
        if engine_mode == "async":
            changes = {"async_scheduling": True, **changes}
        return Engine(tiny_model, replace(ENGINE_CONFIG, **changes))

    return make



@pytest.fixture(scope="session")
def config_factory(tiny_checkpoint):
    def make(**changes) -> ServerConfig:
        base = ServerConfig(model_checkpoint=str(tiny_checkpoint), host="127.0.0.1", port=0, device="cpu",
                            max_batch=ENGINE_CONFIG.max_batch, max_queue=ENGINE_CONFIG.max_queue,
                            drain_seconds=10, request_timeout=30)
        return dataclasses.replace(base, **changes)

    return make


@pytest.fixture
def config(config_factory) -> ServerConfig:
    return config_factory()


@pytest.fixture
def make_client(aiohttp_client, make_engine, config):
    """make_client(config=None, engine=None, ready=True) -> aiohttp TestClient over create_app()."""

    async def make(cfg: ServerConfig | None = None, engine=None, ready: bool = True):
        app = create_app(cfg or config, engine if engine is not None else make_engine())
        client = await aiohttp_client(app)
        if ready:
            async def is_ready():
                resp = await client.get("/readyz")
                return resp.status == 200

            await wait_for(is_ready, timeout=120, what="/readyz")  # an engine process imports torch first
        return client

    return make


@pytest.fixture
async def client(make_client):
    return await make_client()


@pytest.fixture
async def oai(client):
    """The official `openai` client on the test server."""
    import openai

    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0, timeout=30)
    yield api
    await api.close()


# ------------------------------------------------------------------ processes

@pytest.fixture
def server_process(tiny_checkpoint, tmp_path):
    """start(**env) -> (Popen, base_url): `python -m server` on a free port, logs to a file."""
    procs: list[subprocess.Popen] = []

    def start(checkpoint: Path = tiny_checkpoint, **env: str):
        port = free_port()
        log = open(tmp_path / f"server-{port}.log", "wb")
        full_env = {**os.environ, "MODEL_CHECKPOINT": str(checkpoint), "HOST": "127.0.0.1",
                    "PORT": str(port), "DEVICE": "cpu", "MAX_BATCH": "4", **env}
        proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=REPO, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT)
        proc.log_path = tmp_path / f"server-{port}.log"
        procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# ------------------------------------------------------------------ redis

def _start_redis(directory: Path):
    """A real redis-server on a free port, no persistence: (url, Popen, sync client).
    Absent binary: fail in CI, skip elsewhere."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is not installed, and CI=true requires the Redis tests to run")
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI installs it")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            assert proc.poll() is None, "redis-server exited during start-up"
            return False

    try:
        wait_for_sync(pings, timeout=15, what="redis-server PING")
    except BaseException:
        proc.kill()
        raise
    return f"redis://127.0.0.1:{port}/0", proc, client


def _stop_redis(proc, client) -> None:
    client.close()
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a test may have stopped it
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server shared by the session's tests."""
    url, proc, client = _start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        _stop_redis(proc, client)


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, which it may SIGSTOP: (url, Popen)."""
    url, proc, client = _start_redis(tmp_path)
    try:
        yield url, proc
    finally:
        _stop_redis(proc, client)


@pytest.fixture
async def guarded_server():
    """start(app, **ConnectionLimits fields) -> (port, guard): `app` served as `serve()` serves it,
    through server.connections.listen (aiohttp_client's test server bypasses it)."""
    from aiohttp import web

    from server import keys
    from server.connections import ConnectionGuard, ConnectionLimits, listen

    started = []

    async def start(app, **limits):
        runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
        await runner.setup()
        guard = ConnectionGuard(ConnectionLimits(**limits), app.get(keys.METRICS))
        listener = await listen(runner, "127.0.0.1", 0, guard)
        started.append((listener, runner))
        return listener.sockets[0].getsockname()[1], guard

    yield start
    for listener, runner in started:
        listener.close()
        await runner.cleanup()


@pytest.fixture
def guarded_app(guarded_server, make_engine, config):
    """start(config=None, **limits) -> (port, guard, app): the real app with the engine ready."""
    import aiohttp

    from server_helpers import wait_for

    async def start(cfg: ServerConfig | None = None, **limits):
        app = create_app(cfg or config, make_engine())
        port, guard = await guarded_server(app, **limits)

        async def ready():
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
                return r.status == 200

        await wait_for(ready, timeout=120, what="/readyz")
        return port, guard, app

    return start
