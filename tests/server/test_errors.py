"""Every 4xx path (and the 503s), in OpenAI's error shape, naming the field and the limit."""

from __future__ import annotations

import dataclasses

import pytest

from server import keys

from server_helpers import wait_for


async def error_of(resp, status: int) -> dict:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_malformed_json_is_400(client):
    err = await error_of(await client.post("/generate", data=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    err = await error_of(await client.post("/generate", data=b"\xff\xfe", headers={"Content-Type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    err = await error_of(await client.post("/generate", json=["a list"]), 400)
    assert "JSON object" in err["message"]
    err = await error_of(await client.post("/generate", data=b'{"prompt": NaN}', headers={"Content-Type": "application/json"}), 400)


async def test_wrong_content_type_is_415(client):
    err = await error_of(await client.post("/generate", data=b"prompt=hi", headers={"Content-Type": "text/plain"}), 415)
    assert "application/json" in err["message"]
    await error_of(await client.post("/v1/completions", data=b"{}"), 415)


async def test_body_too_large_is_413(make_client, config):
    client = await make_client(dataclasses.replace(config, max_body_bytes=2048))
    err = await error_of(await client.post("/generate", json={"prompt": "x" * 5000}), 413)
    assert "2048" in err["message"]


@pytest.mark.parametrize("body, field, words", [
    ({}, "prompt", "required"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "a", "max_length": 1001}, "max_length", "1000"),
    ({"prompt": "a", "max_length": 0}, "max_length", "between 1"),
    ({"prompt": "a", "max_length": True}, "max_length", "integer"),
    ({"prompt": "a", "max_length": "10"}, "max_length", "integer"),
    ({"prompt": "a", "temperature": 2.5}, "temperature", "2.0"),
    ({"prompt": "a", "temperature": -1}, "temperature", ">= 0"),
    ({"prompt": "a", "top_k": -1}, "top_k", "between 0"),
    ({"prompt": "a", "top_p": 0}, "top_p", "> 0"),
    ({"prompt": "a", "seed": -3}, "seed", "between 0"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "a", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": "caf\u00e9"}, "prompt", "U+00E9"),
])
async def test_generate_validation_names_the_field(client, body, field, words):
    err = await error_of(await client.post("/generate", json=body), 400)
    assert err["param"] == field and words in err["message"], err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, field", [
    ({"prompts": []}, "prompts"),
    ({"prompts": "abc"}, "prompts"),
    ({"prompts": ["ok", 3]}, "prompts[1]"),
    ({"prompts": ["x"] * 9}, "prompts"),
    ({"prompts": ["ok"], "params": {"top_k": -2}}, "params.top_k"),
    ({"prompts": ["ok"], "params": []}, "params"),
])
async def test_batch_validation_names_the_field(client, body, field):
    err = await error_of(await client.post("/batch_generate", json=body), 400)
    assert err["param"] == field


async def test_prompt_too_long_says_count_and_limit(client):
    err = await error_of(await client.post("/generate", json={"prompt": "x" * 300}), 400)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    assert "300 tokens" in err["message"] and "127" in err["message"]  # block_size 128
    err = await error_of(await client.post("/batch_generate", json={"prompts": ["ok", "y" * 200]}), 400)
    assert err["param"] == "prompts[1]"


async def test_openai_validation(client):
    err = await error_of(await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 0}), 400)
    assert err["param"] == "max_tokens"
    err = await error_of(await client.post("/v1/completions", json={"prompt": [99999]}), 400)
    assert err["param"] == "prompt" and "out of range" in err["message"]
    err = await error_of(await client.post("/v1/completions", json={"prompt": "a", "logprobs": 3, "stream": True}), 422)
    assert err["param"] == "logprobs"
    err = await error_of(await client.post("/v1/completions", json={"prompt": ["a", "b"], "stream": True}), 422)
    assert err["param"] == "stream"


async def test_unknown_route_and_method_are_json(client):
    err = await error_of(await client.get("/nope"), 404)
    assert err["code"] == "not_found"
    err = await error_of(await client.get("/generate"), 405)
    assert err["code"] == "method_not_allowed"


async def test_overloaded_engine_is_503_with_retry_after(make_client, make_engine, config):
    engine = make_engine(max_batch=1, max_queue=1)
    client = await make_client(dataclasses.replace(config, max_batch=1, max_queue=1), engine=engine)
    long = {"prompt": "a", "max_length": 1000, "stream": True}
    first = await client.post("/generate", json=long)  # stream headers are sent once submitted
    await wait_for(lambda: engine.stats().running == 1, what="first request running")
    second = await client.post("/generate", json=long)
    await wait_for(lambda: engine.stats().waiting == 1, what="second request waiting")
    try:
        resp = await client.post("/generate", json={"prompt": "a", "max_length": 5})
        err = await error_of(resp, 503)
        assert err["code"] == "overloaded"
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        first.close()
        second.close()


async def test_draining_refuses_new_requests(client):
    client.server.app[keys.LIFECYCLE].draining = True
    resp = await client.post("/generate", json={"prompt": "a"})
    err = await error_of(resp, 503)
    assert err["code"] == "draining" and resp.headers["Retry-After"]
    assert (await client.get("/readyz")).status == 503
    assert (await client.get("/healthz")).status == 200


async def test_bad_checkpoint_is_not_ready_and_not_alive(aiohttp_client, config, tmp_path):
    from server.app import create_app

    bad = dataclasses.replace(config, model_checkpoint=str(tmp_path / "missing"))
    client = await aiohttp_client(create_app(bad))  # no engine: the app loads the checkpoint itself
    lifecycle = client.server.app[keys.LIFECYCLE]
    await wait_for(lambda: lifecycle.loaded.is_set(), what="load attempt")
    err = await error_of(await client.post("/generate", json={"prompt": "a"}), 503)
    assert err["code"] == "not_ready"
    assert (await client.get("/healthz")).status == 503
    assert (await client.get("/readyz")).status == 503
    health = await (await client.get("/health")).json()
    assert health["status"] == "unhealthy" and "missing" in health["error"]


async def test_request_timeout_cancels_and_is_504(make_client, config):
    client = await make_client(dataclasses.replace(config, request_timeout=0.2))
    err = await error_of(await client.post("/generate", json={"prompt": "a", "max_length": 1000}), 504)
    assert err["code"] == "timeout" and "REQUEST_TIMEOUT" in err["message"]
    engine = client.server.app[keys.LIFECYCLE].engine
    await wait_for(lambda: engine.stats().running == 0, what="timed-out request freed")
