"""server/serving.py: long prompts are tokenized off the event loop, and prompts too long to
fit are refused by their byte length before any tokenizing."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from server import keys


def spy_on_encode(monkeypatch, tokenizer) -> list[tuple[int, str]]:
    calls: list[tuple[int, str]] = []
    real = tokenizer.encode

    def encode(text: str):
        calls.append((len(text), threading.current_thread().name))
        return real(text)

    monkeypatch.setattr(tokenizer, "encode", encode)
    return calls


async def test_long_prompts_are_tokenized_on_the_pool(make_client, config, monkeypatch):
    client = await make_client(dataclasses.replace(config, max_body_bytes=4 << 20))
    calls = spy_on_encode(monkeypatch, client.server.app[keys.LIFECYCLE].engine.tokenizer)
    resp = await client.post("/generate", json={"prompt": "ab" * 1500, "max_length": 1})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "context_length_exceeded"
    resp = await client.post("/generate", json={"prompt": "ab", "max_length": 1})
    assert resp.status == 200
    assert [(n, name.startswith("tokenize")) for n, name in calls] == [(3000, True), (2, False)]


async def test_a_flood_of_huge_prompts_is_refused_by_bytes_untokenized(make_client, config, monkeypatch):
    client = await make_client(dataclasses.replace(config, max_body_bytes=4 << 20))
    calls = spy_on_encode(monkeypatch, client.server.app[keys.LIFECYCLE].engine.tokenizer)
    huge = "a" * (1 << 20)

    async def post():
        resp = await client.post("/generate", json={"prompt": huge, "max_length": 1})
        return resp.status, (await resp.json())["error"]

    results = await asyncio.gather(*(post() for _ in range(32)), client.get("/healthz"))
    *refusals, health = results
    assert health.status == 200
    for status, err in refusals:
        assert status == 400 and err["param"] == "prompt"
        assert f"prompt is {1 << 20} bytes; the limit is {32 * 128} (MAX_PROMPT_BYTES)" in err["message"]
    assert calls == []


async def test_max_prompt_bytes_setting(make_client, config):
    client = await make_client(dataclasses.replace(config, max_prompt_bytes=10))
    resp = await client.post("/v1/completions", json={"prompt": "a" * 11, "max_tokens": 1})
    assert resp.status == 400 and "the limit is 10 (MAX_PROMPT_BYTES)" in (await resp.json())["error"]["message"]
