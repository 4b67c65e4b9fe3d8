"""API keys: X-API-Key and Authorization: Bearer, constant-time compare, keys file reload, open probes."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os

import pytest

import server.auth


@pytest.fixture
async def keyed(make_client, config):
    return await make_client(dataclasses.replace(config, api_key="s3cret-key"))


async def test_generation_needs_a_key(keyed):
    resp = await keyed.post("/generate", json={"prompt": "a", "max_length": 2})
    assert resp.status == 401
    err = (await resp.json())["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    resp = await keyed.post("/generate", json={"prompt": "a", "max_length": 2}, headers={"X-API-Key": "wrong"})
    assert resp.status == 401
    assert (await keyed.get("/v1/models")).status == 401


async def test_both_headers_are_accepted(keyed):
    for headers in ({"X-API-Key": "s3cret-key"}, {"Authorization": "Bearer s3cret-key"}):
        resp = await keyed.post("/generate", json={"prompt": "a", "max_length": 2}, headers=headers)
        assert resp.status == 200, headers
    assert (await keyed.get("/v1/models", headers={"Authorization": "bearer s3cret-key"})).status == 200


async def test_probes_and_metrics_stay_open(keyed):
    for path in ("/health", "/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await keyed.get(path)).status == 200, path


async def test_metrics_can_be_protected(make_client, config):
    client = await make_client(dataclasses.replace(config, api_key="k1", metrics_auth=True))
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"X-API-Key": "k1"})).status == 200
    assert (await client.get("/healthz")).status == 200


async def test_comparison_is_constant_time(keyed, monkeypatch):
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server.auth.hmac, "compare_digest", spy)
    await keyed.get("/v1/models", headers={"X-API-Key": "guess"})
    assert calls == [(b"guess", b"s3cret-key")]


async def test_keys_file_is_reread_when_it_changes(make_client, config, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nalpha\n\nbeta\n")
    client = await make_client(dataclasses.replace(config, api_keys_file=str(keys_file)))
    assert (await client.get("/v1/models", headers={"X-API-Key": "alpha"})).status == 200
    assert (await client.get("/v1/models", headers={"X-API-Key": "gamma"})).status == 401
    keys_file.write_text("gamma\n")
    st = keys_file.stat()
    os.utime(keys_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new mtime even on coarse clocks
    assert (await client.get("/v1/models", headers={"X-API-Key": "gamma"})).status == 200
    assert (await client.get("/v1/models", headers={"X-API-Key": "alpha"})).status == 401
    keys_file.unlink()  # a vanished file keeps the last good keys
    assert (await client.get("/v1/models", headers={"X-API-Key": "gamma"})).status == 200


async def test_keys_are_never_logged(make_client, config, caplog):
    caplog.set_level(logging.DEBUG)
    client = await make_client(dataclasses.replace(config, api_key="s3cret-key"))
    await client.post("/generate", json={"prompt": "a", "max_length": 2}, headers={"X-API-Key": "s3cret-key"})
    await client.post("/generate", json={"prompt": "a", "max_length": 2}, headers={"Authorization": "Bearer guess-me"})
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "access" in text or "request" in text
    assert "s3cret-key" not in text and "guess-me" not in text


async def test_rotation_with_the_same_size_and_mtime_is_seen(make_client, config, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("alpha\n")
    before = keys_file.stat()
    client = await make_client(dataclasses.replace(config, api_keys_file=str(keys_file)))
    assert (await client.get("/v1/models", headers={"X-API-Key": "alpha"})).status == 200
    keys_file.write_text("gamma\n")  # same length; put the old timestamps back
    os.utime(keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert keys_file.stat().st_size == before.st_size and keys_file.stat().st_mtime_ns == before.st_mtime_ns
    assert (await client.get("/v1/models", headers={"X-API-Key": "gamma"})).status == 200
    assert (await client.get("/v1/models", headers={"X-API-Key": "alpha"})).status == 401
