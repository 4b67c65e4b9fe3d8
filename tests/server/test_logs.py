"""Structured JSON logs: one access line per request, with the request id; prompts only when asked."""

from __future__ import annotations

import dataclasses
import json
import logging

from server.logs import JsonFormatter


def access_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "server.access" and r.getMessage() == "request"]


async def test_one_access_line_per_request(client, caplog):
    caplog.set_level(logging.INFO)
    await client.post("/generate", json={"prompt": "secret prompt", "max_length": 3},
                      headers={"X-Request-ID": "req-42"})
    [record] = access_records(caplog)
    assert record.request_id == "req-42" and record.status == 200 and record.route == "/generate"
    assert record.prompt_tokens == 13 and record.completion_tokens == 3 and record.duration_s > 0
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-42" and line["msg"] == "request"
    assert "secret prompt" not in json.dumps(line)


async def test_prompts_are_logged_only_with_log_prompts(make_client, config, caplog):
    caplog.set_level(logging.INFO)
    client = await make_client(dataclasses.replace(config, log_prompts=True))
    await client.post("/generate", json={"prompt": "say this", "max_length": 2})
    [record] = access_records(caplog)[-1:]
    assert record.prompts == ["say this"]
