"""The response cache: deterministic requests only, keyed on the model digest, in memory or a real Redis."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from model.sampling import SamplingParams
from server import keys
from server.cache import MemoryCache, cache_key, is_deterministic


def counters(metrics_text: str) -> tuple[float, float]:
    values = {}
    for line in metrics_text.splitlines():
        for name in ("nanogpt_cache_hits_total", "nanogpt_cache_misses_total"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("nanogpt_cache_hits_total", 0.0), values.get("nanogpt_cache_misses_total", 0.0)


def test_only_deterministic_requests_are_cacheable():
    assert is_deterministic(SamplingParams(temperature=0))
    assert is_deterministic(SamplingParams(top_k=1))
    assert is_deterministic(SamplingParams(seed=3))
    assert not is_deterministic(SamplingParams())


def test_key_covers_model_ids_and_every_param():
    base = cache_key("digest-a", [1, 2], SamplingParams(seed=1))
    assert base == cache_key("digest-a", [1, 2], SamplingParams(seed=1))
    assert base != cache_key("digest-b", [1, 2], SamplingParams(seed=1))
    assert base != cache_key("digest-a", [1, 3], SamplingParams(seed=1))
    for change in ({"seed": 2}, {"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.5}, {"max_new_tokens": 5},
                   {"stop": ("x",)}):
        assert base != cache_key("digest-a", [1, 2], dataclasses.replace(SamplingParams(seed=1), **change)), change


async def test_memory_cache_ttl_and_lru():
    now = [0.0]
    cache = MemoryCache(ttl=10, max_entries=2, clock=lambda: now[0])
    await cache.set("a", 1)
    await cache.set("b", 2)
    assert await cache.get("a") == 1  # a is now most recent
    await cache.set("c", 3)  # evicts b
    assert await cache.get("b") is None and await cache.get("c") == 3
    now[0] = 11
    assert await cache.get("a") is None


async def exercise_cache(client) -> None:
    body = {"prompt": "cache me", "max_length": 20, "seed": 11, "temperature": 1.0}
    first = await (await client.post("/generate", json=body)).json()
    engine = client.server.app[keys.LIFECYCLE].engine
    steps = engine.stats().total_steps
    second = await (await client.post("/generate", json=body)).json()
    assert second == first
    assert engine.stats().total_steps == steps  # served without the engine
    await client.post("/generate", json={**body, "seed": None})  # random: never cached
    await client.post("/generate", json={**body, "seed": None})
    hits, misses = counters(await (await client.get("/metrics")).text())
    assert (hits, misses) == (1.0, 1.0)


async def test_in_memory_cache(client):
    await exercise_cache(client)


@pytest.mark.redis
async def test_redis_cache_is_shared_across_replicas(make_client, make_engine, config, redis_url):
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_url)
    await r.flushdb()
    cfg = dataclasses.replace(config, redis_url=redis_url, cache_ttl=60)
    a = await make_client(cfg)
    await exercise_cache(a)
    stored = [k async for k in r.scan_iter("nanogpt:cache:*")]
    assert len(stored) == 1
    assert 0 < await r.pttl(stored[0]) <= 60_000
    await r.aclose()
    b = await make_client(cfg, engine=make_engine())  # another replica, same model digest
    body = {"prompt": "cache me", "max_length": 20, "seed": 11, "temperature": 1.0}
    await b.post("/generate", json=body)
    hits, _ = counters(await (await b.get("/metrics")).text())
    assert hits == 1.0


@pytest.mark.redis
async def test_redis_down_serves_uncached_and_logs_once(make_client, config, caplog):
    from server_helpers import free_port

    caplog.set_level(logging.INFO)
    client = await make_client(dataclasses.replace(config, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    body = {"prompt": "x", "max_length": 4, "temperature": 0}
    for _ in range(3):
        assert (await client.post("/generate", json=body)).status == 200
    warnings = [r for r in caplog.records if "response cache unavailable" in r.getMessage()]
    assert len(warnings) == 1
