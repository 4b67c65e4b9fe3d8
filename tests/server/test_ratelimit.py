"""Rate limits: requests per window and generated-token budgets, in memory and in Redis."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from server import keys
from server.config import RateLimit
from server.errors import RateLimited
from server.ratelimit import RateLimiter


async def test_requests_over_the_limit_get_429_with_retry_after(make_client, config):
    client = await make_client(dataclasses.replace(config, rate_limit=RateLimit(2, 3600)))
    for _ in range(2):
        assert (await client.post("/generate", json={"prompt": "a", "max_length": 2})).status == 200
    resp = await client.post("/generate", json={"prompt": "a", "max_length": 2})
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 3600
    err = (await resp.json())["error"]
    assert err["code"] == "rate_limit_exceeded" and "2 requests" in err["message"]
    assert (await client.get("/health")).status == 200  # probes are never limited
    metrics = await (await client.get("/metrics")).text()
    assert "nanogpt_rate_limited_total 1.0" in metrics


async def test_limits_are_per_key(make_client, config, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("one\ntwo\n")
    client = await make_client(dataclasses.replace(config, api_keys_file=str(keys_file),
                                                   rate_limit=RateLimit(1, 3600)))
    body = {"prompt": "a", "max_length": 2}
    assert (await client.post("/generate", json=body, headers={"X-API-Key": "one"})).status == 200
    assert (await client.post("/generate", json=body, headers={"X-API-Key": "one"})).status == 429
    assert (await client.post("/generate", json=body, headers={"Authorization": "Bearer two"})).status == 200


async def test_token_budget(make_client, config):
    client = await make_client(dataclasses.replace(config, token_budget=10))
    assert (await client.post("/generate", json={"prompt": "a", "max_length": 8})).status == 200
    assert (await client.post("/generate", json={"prompt": "a", "max_length": 8})).status == 200  # 8 < 10 spent
    resp = await client.post("/generate", json={"prompt": "a", "max_length": 8})
    assert resp.status == 429 and "token budget of 10" in (await resp.json())["error"]["message"]
    assert "Retry-After" in resp.headers


async def test_fixed_window_resets():
    now = [1000.0]
    limiter = RateLimiter(RateLimit(1, 60), None, clock=lambda: now[0])
    await limiter.check_request("k")
    with pytest.raises(Exception) as e:
        await limiter.check_request("k")
    assert e.value.status == 429 and 0 < e.value.retry_after <= 60
    now[0] += 60
    await limiter.check_request("k")


@pytest.mark.redis
async def test_redis_limits_are_shared_between_replicas(make_client, config, make_engine, redis_url):
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_url)
    await r.flushdb()
    await r.aclose()
    cfg = dataclasses.replace(config, rate_limit=RateLimit(3, 3600), redis_url=redis_url)
    a = await make_client(cfg)
    b = await make_client(cfg, engine=make_engine())
    body = {"prompt": "a", "max_length": 2}
    statuses = [(await c.post("/generate", json=body)).status for c in (a, b, a, b)]
    assert statuses == [200, 200, 200, 429]


@pytest.mark.redis
async def test_redis_down_falls_back_to_memory(make_client, config, caplog):
    from server_helpers import free_port

    cfg = dataclasses.replace(config, rate_limit=RateLimit(1, 3600), redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = await make_client(cfg)
    body = {"prompt": "a", "max_length": 2}
    assert (await client.post("/generate", json=body)).status == 200
    assert (await client.post("/generate", json=body)).status == 429
    warnings = [r for r in caplog.records if "redis unavailable for rate limits" in r.getMessage()]
    assert len(warnings) == 1  # logged once per outage


async def _concurrent_budget_run(clients, n: int = 15, max_length: int = 100) -> tuple[list[int], int]:
    async def one(i: int):
        resp = await clients[i % len(clients)].post("/generate", json={"prompt": "a", "max_length": max_length,
                                                                        "temperature": 1.0})
        body = await resp.json()
        return resp.status, body.get("tokens_generated", 0)

    results = await asyncio.gather(*(one(i) for i in range(n)))
    return [s for s, _ in results], sum(t for _, t in results)


async def test_concurrent_requests_cannot_overshoot_the_token_budget(make_client, config):
    client = await make_client(dataclasses.replace(config, token_budget=300))
    statuses, generated = await _concurrent_budget_run([client])
    assert statuses.count(200) == 3 and statuses.count(429) == 12  # 3 x 100 held: the budget is full
    assert generated <= 300


async def test_unused_reservations_are_given_back_in_their_window():
    now = [59.0]
    limiter = RateLimiter(None, 10, clock=lambda: now[0])
    held = await limiter.reserve_tokens("k", 8)
    await limiter.reserve_tokens("k", 8)  # 8 of 10 held when it came: admitted
    with pytest.raises(RateLimited, match="spent or held"):
        await limiter.reserve_tokens("k", 1)  # 16 held
    held.used = 3
    now[0] = 61.0  # the request ends in the next window: settle the window it was held in
    await limiter.settle(held)
    await limiter.settle(held)  # once only
    assert (await limiter._memory.add("tok:k", 0, 60.0, 0))[0] == 3 + 8
    assert (await limiter._memory.add("tok:k", 0, 60.0, 1))[0] == 0


async def test_reservations_are_shared_through_redis(make_client, make_engine, config, redis_url):
    cfg = dataclasses.replace(config, token_budget=300, redis_url=redis_url)
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_url).flushdb()
    replicas = [await make_client(cfg), await make_client(cfg, engine=make_engine())]
    statuses, generated = await _concurrent_budget_run(replicas)
    assert statuses.count(200) == 3 and generated <= 300


async def test_a_hung_redis_costs_one_timeout_then_is_skipped_until_it_answers(make_client, config, own_redis, caplog):
    import logging
    import signal

    from server_helpers import wait_for

    url, proc = own_redis
    caplog.set_level(logging.INFO)
    client = await make_client(dataclasses.replace(config, redis_url=url, rate_limit=RateLimit(1000, 60),
                                                   token_budget=100_000, redis_retry_seconds=0.2))
    body = {"prompt": "a", "max_length": 2, "temperature": 0}
    assert (await client.post("/generate", json=body)).status == 200
    breaker = client.server.app[keys.LIMITER]._breaker
    proc.send_signal(signal.SIGSTOP)  # hung: connections stay open, nothing answers
    for _ in range(5):
        assert (await client.post("/generate", json=body)).status == 200
    assert breaker.failures == 1 and breaker.open  # one timeout in all, not five per request
    assert breaker.skipped >= 5 * 3
    proc.send_signal(signal.SIGCONT)
    await wait_for(lambda: not breaker.open, timeout=30, what="the background probe closing the breaker")
    assert (await client.post("/generate", json=body)).status == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "server.breaker"]
    assert messages == ["redis unavailable; using memory for rate limits and skipping the cache until it answers",
                        "redis is back"]
