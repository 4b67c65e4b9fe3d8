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


# RATE_LIMIT_KEY: behind a gateway every request comes from its address; the limits key on its fairness header.

FAIR = {"prompt": "a", "max_length": 2}


def _fairness(config, **changes):
    from server.config import FAIRNESS_HEADER

    return dataclasses.replace(config, rate_limit_key=FAIRNESS_HEADER, **changes)


async def test_fairness_ids_get_budgets_of_their_own(make_client, config):
    client = await make_client(_fairness(config, rate_limit=RateLimit(1, 3600)))
    tenant = lambda i: {"x-gateway-inference-fairness-id": i}  # noqa: E731
    assert (await client.post("/generate", json=FAIR, headers=tenant("team-a"))).status == 200
    assert (await client.post("/generate", json=FAIR, headers=tenant("team-a"))).status == 429
    assert (await client.post("/generate", json=FAIR, headers=tenant("team-b"))).status == 200
    # Header names are case-insensitive; the value is not.
    capitalised = {"X-Gateway-Inference-Fairness-Id": "team-b"}
    assert (await client.post("/generate", json=FAIR, headers=capitalised)).status == 429
    assert (await client.post("/generate", json=FAIR, headers=tenant("TEAM-B"))).status == 200


async def test_token_budgets_follow_the_fairness_id_too(make_client, config):
    client = await make_client(_fairness(config, token_budget=10))
    tenant = lambda i: {"x-gateway-inference-fairness-id": i}  # noqa: E731
    body = {"prompt": "a", "max_length": 10}
    assert (await client.post("/generate", json=body, headers=tenant("a"))).status == 200
    assert (await client.post("/generate", json=body, headers=tenant("a"))).status == 429
    assert (await client.post("/generate", json=body, headers=tenant("b"))).status == 200


async def test_a_request_without_the_header_counts_as_its_api_key(make_client, config, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("one\ntwo\n")
    client = await make_client(_fairness(config, api_keys_file=str(keys_file), rate_limit=RateLimit(1, 3600)))
    assert (await client.post("/generate", json=FAIR, headers={"X-API-Key": "one"})).status == 200
    assert (await client.post("/generate", json=FAIR, headers={"X-API-Key": "one"})).status == 429
    empty = {"X-API-Key": "one", "x-gateway-inference-fairness-id": " "}  # blank is missing
    assert (await client.post("/generate", json=FAIR, headers=empty)).status == 429
    assert (await client.post("/generate", json=FAIR, headers={"X-API-Key": "two"})).status == 200
    tagged = {"X-API-Key": "one", "x-gateway-inference-fairness-id": "t"}
    assert (await client.post("/generate", json=FAIR, headers=tagged)).status == 200
    wrong_key = {"X-API-Key": "nope", "x-gateway-inference-fairness-id": "u"}
    assert (await client.post("/generate", json=FAIR, headers=wrong_key)).status == 401  # keys still checked


async def test_the_header_is_ignored_unless_configured(make_client, config):
    client = await make_client(dataclasses.replace(config, rate_limit=RateLimit(1, 3600)))
    for tenant, status in (("a", 200), ("b", 429)):
        resp = await client.post("/generate", json=FAIR, headers={"x-gateway-inference-fairness-id": tenant})
        assert resp.status == status  # both count as the one client address


async def test_an_oversized_or_repeated_fairness_header_is_a_400(make_client, config):
    from multidict import CIMultiDict

    client = await make_client(_fairness(config, rate_limit=RateLimit(5, 3600), rate_limit_key_max_bytes=64))
    resp = await client.post("/generate", json=FAIR, headers={"x-gateway-inference-fairness-id": "x" * 65})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == "x-gateway-inference-fairness-id" and err["code"] == "invalid_header"
    assert "65 bytes, longer than RATE_LIMIT_KEY_MAX_BYTES=64" in err["message"]
    twice = CIMultiDict([("x-gateway-inference-fairness-id", "a"), ("x-gateway-inference-fairness-id", "b")])
    resp = await client.post("/generate", json=FAIR, headers=twice)
    assert resp.status == 400 and "sent 2 times" in (await resp.json())["error"]["message"]
    ok = await client.post("/generate", json=FAIR, headers={"x-gateway-inference-fairness-id": "x" * 64})
    assert ok.status == 200
    metrics = await (await client.get("/metrics")).text()
    assert "nanogpt_rate_limited_total 0.0" in metrics  # refused as bad input, not counted as limited


def test_rate_limit_key_setting():
    from server.config import ConfigError, load_config

    assert load_config(environ={}).rate_limit_key is None
    assert load_config(environ={"RATE_LIMIT_KEY": "api_key"}).rate_limit_key is None
    assert load_config(environ={"RATE_LIMIT_KEY": "fairness"}).rate_limit_key == "x-gateway-inference-fairness-id"
    assert load_config(environ={"RATE_LIMIT_KEY": "header:X-Tenant"}).rate_limit_key == "x-tenant"
    for bad in ("header:", "header:a b", "tenant", "header:x:y"):
        with pytest.raises(ConfigError, match="RATE_LIMIT_KEY: must be api_key, fairness or header:"):
            load_config(environ={"RATE_LIMIT_KEY": bad})
    with pytest.raises(ConfigError, match="RATE_LIMIT_KEY_MAX_BYTES: must be <= 8190"):
        load_config(environ={"RATE_LIMIT_KEY_MAX_BYTES": "9000"})
