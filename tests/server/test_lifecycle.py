"""Start-up readiness, SIGTERM drain with a request in flight, and client disconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.engine import Engine
from server import keys
from server_helpers import wait_for, wait_ready

REPO = Path(__file__).resolve().parents[2]


class GatedEngine(Engine):
    """The real engine, whose start() waits for the test to open a gate (a slow load/warm-up)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()

    async def start(self) -> None:
        await self.gate.wait()
        await super().start()


async def test_not_ready_until_engine_warmed_up(make_client, tiny_model):
    from server_helpers import ENGINE_CONFIG

    engine = GatedEngine(tiny_model, ENGINE_CONFIG)
    client = await make_client(engine=engine, ready=False)
    assert (await client.get("/healthz")).status == 200  # listening and alive while loading
    assert (await client.get("/readyz")).status == 503
    resp = await client.post("/generate", json={"prompt": "a", "max_length": 2})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "not_ready"
    assert "Retry-After" in resp.headers
    engine.gate.set()

    async def ready():
        return (await client.get("/readyz")).status == 200

    await wait_for(ready, what="/readyz after warm-up")
    assert (await client.post("/generate", json={"prompt": "a", "max_length": 2})).status == 200


def finished(text: str, reason: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "nanogpt_request_finished_total" and s.labels["finish_reason"] == reason:
                return s.value
    return 0.0


async def test_stream_disconnect_cancels_the_engine_request(client, caplog):
    caplog.set_level(logging.INFO)
    engine = client.server.app[keys.LIFECYCLE].engine
    resp = await client.post("/generate", json={"prompt": "a", "max_length": 1000, "stream": True})
    await resp.content.readline()  # the first event: generation is running
    assert engine.stats().running == 1
    resp.close()  # the client goes away
    await wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, what="slot freed")

    async def cancelled():
        return finished(await (await client.get("/metrics")).text(), "cancelled") == 1

    await wait_for(cancelled, what="cancelled request in metrics")
    access = [r for r in caplog.records if r.getMessage() == "request" and r.path == "/generate"]
    assert [r.status for r in access] == [499]  # logged as a client disconnect, not a server error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_disconnect_from_a_stream_of_n_choices_cancels_all_of_them(client):
    engine = client.server.app[keys.LIFECYCLE].engine
    resp = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1000, "n": 3, "stream": True,
                                                      "logprobs": 1, "temperature": 1.0})
    await resp.content.readline()  # the first event: generation is running
    await wait_for(lambda: engine.stats().running == 3, what="all three choices running")
    resp.close()
    await wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, what="slots freed")

    async def cancelled():
        return finished(await (await client.get("/metrics")).text(), "cancelled") == 3

    await wait_for(cancelled, what="3 cancelled requests in metrics")


async def test_non_streaming_disconnect_cancels_the_engine_request(client):
    engine = client.server.app[keys.LIFECYCLE].engine
    task = asyncio.create_task(client.post("/generate", json={"prompt": "a", "max_length": 1000}))
    await wait_for(lambda: engine.stats().running == 1, what="request running")
    task.cancel()  # closes the connection: aiohttp cancels the handler, whose finally cancels the request
    await wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, what="slot freed")

    async def cancelled():
        return finished(await (await client.get("/metrics")).text(), "cancelled") == 1

    await wait_for(cancelled, what="cancelled request in metrics")


async def read_events(resp: aiohttp.ClientResponse) -> list[str]:
    return [ln[6:] for ln in (await resp.text()).splitlines() if ln.startswith("data: ")]


async def test_sigterm_drains_in_flight_requests_then_exits_0(server_process):
    proc, base = server_process(DRAIN_SECONDS="30")
    async with aiohttp.ClientSession() as http:
        probes: list[tuple[int, int]] = []  # (/healthz, /readyz) statuses while starting

        async def ready():
            try:
                async with http.get(base + "/healthz") as live, http.get(base + "/readyz") as r:
                    probes.append((live.status, r.status))
                    return r.status == 200
            except aiohttp.ClientConnectionError:
                assert proc.poll() is None, proc.log_path.read_text()
                return False

        await wait_for(ready, timeout=180, what="server ready")
        # alive from the first answer; ready only at the end (the load is logged after "listening", below)
        assert all(live == 200 for live, _ in probes) and [r for _, r in probes].count(200) == 1
        async with http.post(base + "/generate", json={"prompt": "ROMEO:", "max_length": 1000, "stream": True}) as resp:
            first = await resp.content.readline()  # in flight
            assert first.startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)

            async def not_ready():
                async with http.get(base + "/readyz") as r:
                    return r.status == 503

            await wait_for(not_ready, timeout=10, what="readiness off after SIGTERM")
            async with http.post(base + "/generate", json={"prompt": "a", "max_length": 2}) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "draining"
                assert "Retry-After" in refused.headers
            events = [first.decode()[6:].strip()] + await read_events(resp)
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["finish_reason"] == "length" and final["tokens_generated"] == 1000
    code = await asyncio.to_thread(proc.wait, 60)
    log = proc.log_path.read_text()
    assert code == 0, log
    lines = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]
    msgs = [ln["msg"] for ln in lines]
    assert msgs.index("listening") < msgs.index("model ready") < msgs.index("draining") < msgs.index("stopped")
    access = [ln for ln in lines if ln["msg"] == "request" and ln["path"] == "/generate"]
    assert {a["status"] for a in access} == {200, 503}
    assert all("prompts" not in a for a in access)  # prompts are not logged by default
    config_line = next(ln for ln in lines if ln["msg"] == "configuration")
    assert config_line["config"]["PORT"] == int(base.rsplit(":", 1)[1])


async def test_a_stopped_app_lets_go_of_its_engine(aiohttp_client, make_engine, config):
    """aiohttp caches every app it served (its middleware chains, module-level); the engine, and
    with it the model and the KV cache, must not stay alive in that cache once the app stopped."""
    import gc
    import weakref

    from server.app import create_app

    engine = make_engine()
    gone = weakref.ref(engine)
    client = await aiohttp_client(create_app(config, engine))
    await wait_for(lambda: engine.ready, what="engine ready")
    assert (await client.post("/generate", json={"prompt": "a", "max_length": 2})).status == 200
    await client.close()  # the app's cleanup: drain and stop the engine
    assert not engine.alive
    del engine
    gc.collect()
    assert gone() is None


def test_kv_cache_over_the_budget_is_refused_with_size_and_budget(config_factory):
    from server.app import KVCacheTooLarge, load_engine

    # The tiny model: 2 layers x 4 rows x 128 positions x 32 wide x keys and values x 4 bytes.
    with pytest.raises(KVCacheTooLarge) as err:
        load_engine(config_factory(kv_cache_max_bytes=100_000))
    assert "262144 bytes" in str(err.value) and "KV_CACHE_MAX_BYTES=100000" in str(err.value)
    assert load_engine(config_factory(kv_cache_max_bytes=262_144)) is not None


async def test_sigterm_interrupts_a_slow_checkpoint_load(server_process, tmp_path):
    """A pickle that takes minutes to scan (allowed by a raised MAX_PICKLE_BYTES): SIGTERM still exits at once."""
    sys.path.insert(0, str(REPO / "tests" / "model"))
    from test_safe_load import write_bomb

    bomb = tmp_path / "slow.pt"
    write_bomb(bomb, 256 << 20)
    proc, base = server_process(bomb, MAX_PICKLE_BYTES=str(1 << 30))

    async def listening():
        async with aiohttp.ClientSession() as http:
            try:
                async with http.get(base + "/healthz") as r:
                    return r.status == 200  # alive, loading
            except aiohttp.ClientConnectionError:
                assert proc.poll() is None, proc.log_path.read_text()
                return False

    await wait_for(listening, timeout=60, what="server listening")
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 30)  # before: the load ran to its end first
    log = proc.log_path.read_text()
    assert code == 0, log
    assert '"stopped"' in log and '"model ready"' not in log


async def test_requests_cut_at_the_end_of_the_drain_get_an_answer(server_process):
    proc, base = server_process(DRAIN_SECONDS="0")
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, base, proc)
        long = {"prompt": "ROMEO:", "max_length": 1000}
        async with http.post(base + "/generate", json={**long, "stream": True}) as stream:
            first = await stream.content.readline()
            assert first.startswith(b"data: ")
            plain = asyncio.create_task(http.post(base + "/generate", json=long))

            async def both_running():
                async with http.get(base + "/health") as r:
                    return (await r.json())["engine"]["running"] == 2

            await wait_for(both_running, timeout=30, what="both requests running")
            proc.send_signal(signal.SIGTERM)
            events = await read_events(stream)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "draining"
        resp = await plain
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "draining"
        resp.release()
    code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, proc.log_path.read_text()
