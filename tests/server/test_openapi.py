"""Nothing a client sends may produce a 5xx: schemathesis fuzzes a real server process from
its own /openapi.json, with valid (positive) and invalid (negative) requests."""

from __future__ import annotations

import time

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from model.engine import Engine
from server import create_app
from server_helpers import ThreadServer, wait_for_sync

EXAMPLES = 15  # per operation and mode: bounded so the whole run stays well under a minute


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, config_factory):
    """A real listening server (thread) with short generations and small limits: a fuzzer's
    request must never take long."""
    from server_helpers import ENGINE_CONFIG

    cfg = config_factory(max_length_limit=8, max_body_bytes=4096, cache_ttl=60, max_n=2)
    with ThreadServer(create_app(cfg, Engine(tiny_model, ENGINE_CONFIG))) as server:

        def ready() -> bool:
            return requests.get(server.base_url + "/readyz", timeout=5).status_code == 200

        wait_for_sync(ready, timeout=180, what="server ready")
        yield server.base_url


def test_openapi_describes_every_route(fuzz_server):
    base = fuzz_server
    doc = requests.get(base + "/openapi.json", timeout=5).json()
    assert set(doc["paths"]) == {"/generate", "/batch_generate", "/v1/completions", "/v1/chat/completions",
                                 "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info", "/health",
                                 "/healthz", "/readyz", "/metrics"}
    gen = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    assert gen["max_length"]["maximum"] == 8  # the configured limit


@pytest.mark.slow
def test_no_input_produces_a_server_error(fuzz_server):
    base = fuzz_server
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    session = requests.Session()
    failures: list[str] = []
    start = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        # GETs take no input: there is nothing to make invalid
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method == "post" else [])
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            def check(case):
                response = case.call(base_url=base, session=session, timeout=30)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code} "
                                    f"{response.text[:300]}")

            check()
    assert requests.get(base + "/healthz", timeout=5).status_code == 200, "the server died"
    assert not failures, "\n".join(failures[:10])
    assert time.monotonic() - start < 90
