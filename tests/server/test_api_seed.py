"""The seed's endpoints, exactly: /generate, /batch_generate, /health, and the probes."""

from __future__ import annotations

import json

import pytest

# Every test here runs against the in-process Engine, the engine core in its own process, and the
# in-process Engine with async scheduling.
pytestmark = pytest.mark.parametrize(
    "engine_mode", ["in_process", pytest.param("remote", marks=pytest.mark.slow), "async"], indirect=True)

async def test_generate_returns_the_seeds_shape(client):
    resp = await client.post("/generate", json={"prompt": "ROMEO:", "max_length": 12, "temperature": 0.8, "top_k": 5})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"prompt", "generated_text", "tokens_generated"}
    assert body["prompt"] == "ROMEO:"
    assert body["generated_text"].startswith("ROMEO:")
    assert body["tokens_generated"] == 12
    assert len(body["generated_text"]) == len("ROMEO:") + 12  # one char per token


async def test_generate_defaults_and_seed_is_reproducible(client):
    a = await (await client.post("/generate", json={"prompt": "abc", "seed": 7, "max_length": 20})).json()
    b = await (await client.post("/generate", json={"prompt": "abc", "seed": 7, "max_length": 20})).json()
    assert a == b
    c = await (await client.post("/generate", json={"prompt": "abc"})).json()
    assert c["tokens_generated"] == 100  # the seed's default max_length


async def test_generate_stop_string_cuts_the_text(client):
    params = {"prompt": "hello", "max_length": 30, "temperature": 1.0, "top_k": 0, "seed": 3}
    full = await (await client.post("/generate", json=params)).json()
    continuation = full["generated_text"][len("hello"):]
    # the first character that has not appeared before in the continuation
    cut = next(i for i in range(1, len(continuation)) if continuation[i] not in continuation[:i])
    body = await (await client.post("/generate", json={**params, "stop": continuation[cut]})).json()
    assert body["generated_text"] == "hello" + continuation[:cut]


async def test_batch_generate_results_in_order_and_batched(client):
    prompts = ["A", "BB", "CCC", "DDDD", "EEEEE"]
    params = {"max_length": 8, "temperature": 0}
    resp = await client.post("/batch_generate", json={"prompts": prompts, "params": params})
    assert resp.status == 200, await resp.text()
    results = (await resp.json())["results"]
    assert [r["prompt"] for r in results] == prompts
    for prompt, r in zip(prompts, results):
        assert set(r) == {"prompt", "generated_text", "tokens_generated"}
        assert r["generated_text"].startswith(prompt)
        single = await (await client.post("/generate", json={"prompt": prompt, **params})).json()
        assert single == r  # greedy: batching changes nothing


async def test_batch_generate_runs_prompts_concurrently(client):
    """Real batching: the prompts decode together in the engine, not one after another."""
    from server import keys

    engine = client.server.app[keys.LIFECYCLE].engine
    before = engine.stats().total_steps
    resp = await client.post("/batch_generate", json={"prompts": ["a", "b", "c"], "params": {"max_length": 50}})
    assert resp.status == 200
    assert all(r["tokens_generated"] == 50 for r in (await resp.json())["results"])
    steps = engine.stats().total_steps - before
    assert steps < 2 * 50, f"{steps} engine steps for 3 x 50 tokens: not batched"


async def test_generate_streams_sse(client):
    resp = await client.post("/generate", json={"prompt": "Hi", "max_length": 10, "stream": True, "seed": 1})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    final = chunks[-1]
    assert final["finish_reason"] == "length" and final["tokens_generated"] == 10
    text = "".join(c["text"] for c in chunks[:-1])
    assert final["generated_text"] == "Hi" + text
    plain = await (await client.post("/generate", json={"prompt": "Hi", "max_length": 10, "seed": 1})).json()
    assert plain["generated_text"] == final["generated_text"]


async def test_health_reports_device_model_digest(client, tiny_model):
    resp = await client.get("/health")
    body = await resp.json()
    assert resp.status == 200
    assert body["status"] == "healthy" and body["device"] == "cpu"
    assert body["model"] == "tiny-char"
    assert body["checkpoint_digest"] == tiny_model.checkpoint_info.digest
    assert body["parameters"] == tiny_model.checkpoint_info.n_params


async def test_probes(client):
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["ready"] is True


async def test_request_id_is_echoed_or_generated(client):
    resp = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.post("/generate", json={"prompt": "x", "max_length": 2, "stream": True},
                             headers={"X-Request-ID": "stream-1"})
    assert resp.headers["X-Request-ID"] == "stream-1"
    resp = await client.get("/health")
    assert len(resp.headers["X-Request-ID"]) == 32
