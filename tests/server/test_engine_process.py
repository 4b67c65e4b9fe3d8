"""ENGINE_PROCESS: the server over an engine core in its own process. The API tests run
against it too (test_api_seed.py, test_api_openai.py); here, the core's death: /healthz 503,
the in-flight request fails, and `python -m server` exits non-zero for the kubelet; and logprobs
the same as in-process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from server import keys
from server.app import load_engine
from server_helpers import wait_for, wait_ready

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
        await wait_ready(http, base, proc)
        async with http.post(base + "/generate", json={"prompt": "ab", "max_length": 5}) as r:
            assert r.status == 200 and (await r.json())["tokens_generated"] == 5
    children = core_pids(proc.pid)
    assert children, "no engine-core child process"
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    code = await asyncio.to_thread(proc.wait, 60)
    assert code == 1, proc.log_path.read_text()
    assert "engine core process exited unexpectedly" in proc.log_path.read_text()


async def test_logprobs_are_the_same_with_the_engine_in_its_own_process(make_client, tiny_model, tiny_checkpoint):
    """Completions with echo + logprobs (JSON and streamed) and chat logprobs, with the engine in this
    process and in its own: the same numbers, tokens and alternatives."""
    from model.engine import Engine
    from model.engine.client import EngineClient
    from model.engine.protocol import CoreSpec
    from server_helpers import ENGINE_CONFIG

    local = await make_client(engine=Engine(tiny_model, ENGINE_CONFIG))
    remote = await make_client(engine=EngineClient(CoreSpec(checkpoint=str(tiny_checkpoint), device="cpu",
                                                            dtype="float32", engine=ENGINE_CONFIG)))
    requests = [("/v1/completions", {"prompt": "ROMEO: so", "max_tokens": 6, "temperature": 0, "echo": True,
                                     "logprobs": 3}),
                ("/v1/completions", {"prompt": "ab", "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2,
                                     "logprobs": 1, "stream": True}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                          "temperature": 0, "logprobs": True, "top_logprobs": 2})]

    async def answer(client, path, body):
        resp = await client.post(path, json=body)
        assert resp.status == 200, await resp.text()
        if not body.get("stream"):
            return [c["logprobs"] for c in (await resp.json())["choices"]]
        by_index: dict = {}  # each choice's chunks put together (how tokens group into chunks varies)
        for ln in (await resp.text()).splitlines():
            for ch in json.loads(ln[6:])["choices"] if ln.startswith("data: {") else ():
                whole = by_index.setdefault(ch["index"], {"text": "", "logprobs": {}})
                whole["text"] += ch["text"]
                for key, values in ch["logprobs"].items():
                    whole["logprobs"][key] = whole["logprobs"].get(key, []) + values
        return [by_index[i] for i in sorted(by_index)]

    for path, body in requests:
        a, b = await answer(local, path, body), await answer(remote, path, body)
        assert a and same(a, b), (path, body, a, b)


def same(a, b) -> bool:
    """Equal JSON, floats within 1e-5 (two processes may sum in another order)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
