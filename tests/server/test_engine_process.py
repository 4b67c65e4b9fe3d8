"""ENGINE_PROCESS: the server over an engine core in its own process. The API tests run
against it too (test_api_seed.py, test_api_openai.py); here, the core's death: /healthz 503,
the in-flight request fails, and `python -m server` exits non-zero for the kubelet."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from server import keys
from server.app import load_engine
from server_helpers import wait_for

pytestmark = pytest.mark.slow  # each test starts processes that import torch


def test_the_setting_selects_the_engine_client(config_factory):
    from model.engine import Engine
    from model.engine.client import EngineClient

    assert isinstance(load_engine(config_factory(engine_process=True)), EngineClient)
    assert isinstance(load_engine(config_factory()), Engine)


@pytest.mark.parametrize("engine_mode", ["remote"], indirect=True)
async def test_core_death_turns_healthz_503_and_fails_the_request(client):
    engine = client.app[keys.LIFECYCLE].engine
    resp = await client.post("/generate", json={"prompt": "ab", "max_length": 1000, "stream": True})
    assert (await resp.content.readline()).startswith(b"data: ")
    os.kill(engine.pid, signal.SIGKILL)

    async def unhealthy():
        return (await client.get("/healthz")).status == 503

    await wait_for(unhealthy, what="/healthz 503 after the core died")
    assert (await client.get("/readyz")).status == 503
    rest = await resp.text()
    assert "[DONE]" not in rest or "error" in rest


def core_pids(pid: int) -> list[int]:
    """The process's children (Linux: listed per thread, and the core is started from one)."""
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir()
            for p in (task / "children").read_text().split()]


async def test_server_exits_non_zero_when_the_core_dies(server_process):
    proc, base = server_process(ENGINE_PROCESS="true", CPU_ATTENTION="torch", CPU_LINEAR="out_in")
    async with aiohttp.ClientSession() as http:
        async def ready():
            try:
                async with http.get(base + "/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientConnectionError:
                assert proc.poll() is None, proc.log_path.read_text()
                return False

        await wait_for(ready, timeout=120, what="server ready")
        async with http.post(base + "/generate", json={"prompt": "ab", "max_length": 5}) as r:
            assert r.status == 200 and (await r.json())["tokens_generated"] == 5
    children = core_pids(proc.pid)
    assert children, "no engine-core child process"
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    code = await asyncio.to_thread(proc.wait, 60)
    assert code == 1, proc.log_path.read_text()
    assert "engine core process exited unexpectedly" in proc.log_path.read_text()
