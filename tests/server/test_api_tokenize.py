"""/tokenize, /detokenize, /tokenizer_info (vLLM's shapes) and a /health that tells the truth."""

from __future__ import annotations

import asyncio

from server import keys
from server_helpers import wait_for


async def test_tokenize_round_trip(client, tiny_model):
    resp = await client.post("/tokenize", json={"prompt": "Hello, world", "add_special_tokens": False})
    body = await resp.json()
    assert body["tokens"] == tiny_model.tokenizer.encode("Hello, world")
    assert body["count"] == 12 and body["max_model_len"] == 128 and body["token_strs"] is None
    back = await (await client.post("/detokenize", json={"tokens": body["tokens"]})).json()
    assert back == {"prompt": "Hello, world"}


async def test_tokenizer_errors_name_the_field(client):
    for path, body, field in (("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 5}, "prompt"),
                              ("/tokenize", {"prompt": "\u00e9"}, "prompt"),
                              ("/detokenize", {"tokens": [1, 999]}, "tokens"),
                              ("/detokenize", {"tokens": "12"}, "tokens"),
                              ("/tokenize", {"prompt": "a", "model": "other"}, "model")):
        resp = await client.post(path, json=body)
        assert resp.status in (400, 404) and (await resp.json())["error"]["param"] == field, body


async def test_tokenizer_info_has_what_lm_evals_remote_tokenizer_reads(client):
    info = await (await client.get("/tokenizer_info")).json()
    assert info["tokenizer_class"] == "CharTokenizer" and info["vocab_size"] == 96
    assert info["eos_token"] is None and info["max_model_len"] == 128 and "messages" in info["chat_template"]


async def test_health_says_loading_until_it_can_serve(make_client, make_engine):
    engine = make_engine()
    gate = asyncio.Event()
    start = engine.start

    async def slow_start():
        await gate.wait()
        await start()

    engine.start = slow_start
    client = await make_client(engine=engine, ready=False)
    resp = await client.get("/health")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "loading" and body["ready"] is False
    gate.set()

    async def healthy():
        return (await client.get("/health")).status == 200

    await wait_for(healthy, what="/health 200")
    assert (await (await client.get("/health")).json())["status"] == "healthy"
    assert (await client.post("/generate", json={"prompt": "a", "max_length": 2})).status == 200
    client.server.app[keys.LIFECYCLE].draining = True
    resp = await client.get("/health")
    assert resp.status == 503 and (await resp.json())["status"] == "draining"
