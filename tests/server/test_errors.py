"""Every 4xx path (and the 503s), in OpenAI's error shape, naming the field and the limit."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from server import keys

from server_helpers import parse_response, raw_exchange, wait_for


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
    err = await error_of(await client.post("/v1/completions", json={"prompt": "a", "n": 2, "best_of": 3}), 422)
    assert err["param"] == "best_of"


async def test_unknown_route_and_method_are_json(client):
    err = await error_of(await client.get("/nope"), 404)
    assert err["code"] == "not_found"
    err = await error_of(await client.get("/generate"), 405)
    assert err["code"] == "method_not_allowed"


async def test_overloaded_engine_is_503_with_retry_after(make_client, make_engine, config):
    engine = make_engine(max_batch=1, max_queue=1)
    client = await make_client(dataclasses.replace(config, max_batch=1, max_queue=1, max_rows_per_caller=3),
                               engine=engine)  # the engine's queue, not the caller's share, is what fills
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


def _post(headers: bytes, body: bytes) -> bytes:
    return (b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def test_corrupt_compressed_body_is_400(guarded_app, caplog):
    port, _, _ = await guarded_app()  # as served: aiohttp's test server logs its own error on the rest
    for encoding in (b"gzip", b"deflate"):
        raw = await raw_exchange(port, _post(b"Content-Encoding: " + encoding + b"\r\n", b"not " * 8))
        status, _, body = parse_response(raw)
        assert status == 400, raw
        err = json.loads(body)["error"]
        assert err["code"] == "invalid_body" and encoding.decode() in err["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_non_utf8_api_key_is_401(make_client, config, caplog):
    client = await make_client(dataclasses.replace(config, api_key="s3cret-key"))
    for header in (b"X-API-Key: \xff\xfe\r\n", b"Authorization: Bearer \xc3\x28\r\n"):
        raw = await raw_exchange(client.server.port, _post(header, b'{"prompt": "a", "max_length": 2}'))
        status, _, body = parse_response(raw)
        assert status == 401, raw
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("body, words", [
    (b'{"prompt": NaN}', "NaN is not valid JSON"),
    (b'{"prompt": "a", "max_length": -Infinity}', "-Infinity is not valid JSON"),
    (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", "4300 digits"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "MAX_JSON_DEPTH=64"),
    (b'{"prompt": "a",}', "line 1 column"),
])
async def test_malformed_json_says_why(client, body, words):
    err = await error_of(await client.post("/generate", data=body, headers={"Content-Type": "application/json"}), 400)
    assert err["code"] == "invalid_json" and words in err["message"], err["message"]
    assert "set_int_max_str_digits" not in err["message"]


async def test_brackets_inside_strings_do_not_count_as_nesting(client):
    resp = await client.post("/generate", json={"prompt": "[{" * 50, "max_length": 1})
    assert resp.status == 200, await resp.text()


async def test_405_carries_allow(client):
    resp = await client.get("/generate")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert "POST" in (await resp.json())["error"]["message"]
