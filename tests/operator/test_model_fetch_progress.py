"""status.fetch's bytes while a pod fetches: the fetcher's JSON progress lines, read from the pod's log.

Parsing is pure (fetch_status.parse_progress); reading goes through the operator's own client against a
loopback API server that serves pods/log as the API server does (text/plain, container / tailLines /
limitBytes), and under kopf against kmock's emulator with a reaction serving the `log` subresource."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from operator_helpers import CRD_PATH, serve_loopback
from test_model_fetch import NOW, S3, SOURCES, conditions, deployment, fetch_pod

from model.fetch.transfer import Status
from nanogpt_operator.client import KubeClient
from nanogpt_operator.config import OperatorConfig
from nanogpt_operator.model.fetch_progress import TAIL_LINES, fetch_progress
from nanogpt_operator.model.fetch_status import FetchProgress, parse_progress
from nanogpt_operator.model.spec import parse_model
from nanogpt_operator.model.status import derive_status

URI = "https://example.com/out/ckpt.pt?X-Amz-Signature=secret"
CONFIG = OperatorConfig()


def progress_line(done: int, total: int | None, rate: float = 1000.0, eta: float | None = 2.5) -> str:
    """A line exactly as `python -m model fetch` prints it on stdout (cli._print of Status.as_dict)."""
    return json.dumps(Status(URI, "ckpt.pt", done, total, rate, eta).as_dict(), separators=(",", ":"))


def prose(done: str) -> str:
    return f"2026-01-01 00:00:00 INFO model.fetch: fetch {URI}: {done} of 1.0 MiB (50%), 1.0 KiB/s, ETA 2 s"


# ------------------------------------------------------------------ parsing

def test_the_last_good_line_wins_among_prose() -> None:
    log = "\n".join([progress_line(100, 1000), prose("100 B"), progress_line(524288, 1048576), prose("512 KiB"), ""])
    assert parse_progress(log) == FetchProgress(done_bytes=524288, total_bytes=1048576, rate_bps=1000, eta_s=2)


def test_a_garbled_line_is_skipped() -> None:
    good, newer = progress_line(10, 100), progress_line(20, 100)
    # limitBytes cut the newest line in two; a line that is JSON but not a count; a negative and a bool.
    tails = [newer[: len(newer) // 2], '{"phase":"Fetching","bytes_done":"20"}', '{"phase":"Fetching","bytes_done":-1}',
             '{"phase":"Fetching","bytes_done":true}', '{"phase":"Fetching","bytes_done":200,"bytes_total":100}',
             "[1, 2]", "\x00\xff garbage"]
    for tail in tails:
        assert parse_progress(f"{good}\n{tail}") == FetchProgress(10, 100, 1000, 2), tail
        assert parse_progress(tail) is None, tail


def test_a_line_from_an_older_fetcher_gives_no_bytes() -> None:
    # Before the JSON lines the fetcher logged prose only; the final status line is not progress either.
    assert parse_progress("\n".join([prose("512 KiB"), prose("1.0 MiB")])) is None
    assert parse_progress('{"phase":"Fetched","sha256":"ab","bytes":5}') is None
    assert parse_progress('{"phase":"Fetching","uri":"https://example.com/ckpt.pt"}') is None
    assert parse_progress("") is None


def test_an_unknown_size_keeps_the_bytes_done() -> None:
    assert parse_progress(progress_line(4096, None, eta=None)) == FetchProgress(4096, None, 1000, None)


# ------------------------------------------------------------------ status

def test_status_fetch_gains_the_bytes_and_no_credential(model_body) -> None:
    m = parse_model(model_body(checkpoint=SOURCES["https"]))
    pods = [fetch_pod("llm-1", {"running": {"startedAt": NOW}})]
    progress = parse_progress(progress_line(524288, 1048576))
    status = derive_status(m, 1, deployment(model_body, SOURCES["https"]), pods, {}, None, NOW, progress)
    assert status["phase"] == "Fetching"
    assert status["fetch"] == {"phase": "Fetching", "uri": "https://example.com/out/ckpt.pt?…", "pod": "llm-1",
                               "doneBytes": 524288, "totalBytes": 1048576, "rateBytesPerSecond": 1000,
                               "etaSeconds": 2}
    assert "524288 of 1048576 bytes" in conditions(status)["Fetched"][2]
    assert "secret" not in json.dumps(status)
    # The API server prunes status fields its structural schema does not declare.
    crd = yaml.safe_load(CRD_PATH.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(status["fetch"]) <= set(schema["fetch"]["properties"])


def test_progress_is_dropped_once_the_fetch_ended(model_body) -> None:
    m = parse_model(model_body(checkpoint=S3))
    done = fetch_pod("llm-1", {"terminated": {"exitCode": 0, "message": json.dumps({"phase": "Fetched", "bytes": 5})}})
    status = derive_status(m, 1, deployment(model_body, S3), [done], {}, None, NOW, FetchProgress(1, 5, 1, 1))
    assert status["fetch"] == {"phase": "Fetched", "uri": S3["uri"], "pod": "llm-1", "bytes": 5}


# ------------------------------------------------------------------ reading the log through the client

@pytest.fixture
async def log_api() -> AsyncIterator[dict[str, Any]]:
    """A loopback API server with pods/log: `answers[pod]` is (status, body) or text; requests are kept."""
    state: dict[str, Any] = {"answers": {}, "requests": [], "release": asyncio.Event()}

    async def log(request: web.Request) -> web.Response:
        state["requests"].append((request.match_info["pod"], dict(request.query)))
        answer = state["answers"].get(request.match_info["pod"])
        if answer == "hang":  # a kubelet that never answers
            await state["release"].wait()
        if answer is None:
            return web.json_response({"kind": "Status", "reason": "NotFound", "message": "pods not found"}, status=404)
        if isinstance(answer, tuple) and isinstance(answer[1], str):
            return web.Response(text=answer[1], status=answer[0])
        if isinstance(answer, tuple):
            return web.json_response(answer[1], status=answer[0])
        return web.Response(text=answer, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ml/pods/{pod}/log", log)
    async with serve_loopback(app) as url:
        async with aiohttp.ClientSession() as session:
            state["client"] = KubeClient(session, url, lambda: None, "test")
            yield state
            state["release"].set()


async def test_the_fetching_pod_log_is_read_bounded(log_api, model_body) -> None:
    m = parse_model(model_body(checkpoint=S3))
    log_api["answers"]["llm-2"] = "\n".join([prose("1 KiB"), progress_line(2048, 4096)]) + "\n"
    pods = [fetch_pod("llm-1", {"waiting": {"reason": "PodInitializing"}}),
            fetch_pod("llm-2", {"running": {"startedAt": NOW}})]
    assert await fetch_progress(log_api["client"], m, pods, CONFIG) == FetchProgress(2048, 4096, 1000, 2)
    assert log_api["requests"] == [("llm-2", {"container": "fetch", "tailLines": str(TAIL_LINES),
                                              "limitBytes": "8192"})]


@pytest.mark.parametrize("answer", [None, (403, {"kind": "Status", "reason": "Forbidden", "message": "pods/log"}),
                                    (400, {"kind": "Status", "reason": "BadRequest", "message": "container gone"}),
                                    (503, {"kind": "Status", "reason": "ServiceUnavailable"}), (502, "not json")])
async def test_an_unreadable_log_is_no_error(log_api, model_body, caplog, answer) -> None:
    m = parse_model(model_body(checkpoint=S3))
    if answer is not None:
        log_api["answers"]["llm-1"] = answer
    pods = [fetch_pod("llm-1", {"running": {"startedAt": NOW}})]
    with caplog.at_level(logging.DEBUG, logger="nanogpt_operator.fetch"):
        assert await fetch_progress(log_api["client"], m, pods, CONFIG) is None
    (record,) = [r for r in caplog.records if r.name == "nanogpt_operator.fetch"]
    assert record.levelno == logging.DEBUG and "llm-1" in record.getMessage()


async def test_a_hung_log_read_gives_up_at_its_own_deadline(log_api, model_body) -> None:
    log_api["answers"]["llm-1"] = "hang"
    pods = [fetch_pod("llm-1", {"running": {"startedAt": NOW}})]
    fast = OperatorConfig(fetch_log_timeout_s=0.2)
    # Bounded far below the session's own timeout (aiohttp's default, 300 s): the log read's deadline applies.
    progress = await asyncio.wait_for(fetch_progress(log_api["client"], parse_model(model_body(checkpoint=S3)),
                                                     pods, fast), 60)
    assert progress is None and len(log_api["requests"]) == 1


async def test_no_log_is_read_unless_a_pod_is_fetching(log_api, model_body) -> None:
    fetching = [fetch_pod("llm-1", {"running": {"startedAt": NOW}})]
    done = [fetch_pod("llm-1", {"terminated": {"exitCode": 0, "message": "{}"}})]
    client = log_api["client"]
    assert await fetch_progress(client, parse_model(model_body()), fetching, CONFIG) is None  # a claim: no fetch
    assert await fetch_progress(client, parse_model(model_body(checkpoint=S3)), done, CONFIG) is None
    assert await fetch_progress(client, parse_model(model_body(checkpoint=S3)), fetching, OperatorConfig(fetch_log_bytes=0)) is None  # off
    assert log_api["requests"] == []


# ------------------------------------------------------------------ under kopf, against kmock's emulator

async def test_a_fetching_model_under_kopf_shows_the_bytes_done(emulator, model_body) -> None:
    from operator_helpers import eventually, model_path
    from test_model_fetch import LABELS, POD
    from test_model_kopf import model_status, operator

    emu, api = emulator
    served: list[dict[str, str]] = []
    log = {"text": prose("0 B") + "\n"}

    def pod_log(request: Any) -> bytes:
        served.append(dict(request.params))
        return log["text"].encode()

    # The emulator stores objects only; the kubelet's log endpoint is this reaction (text, as the API serves it).
    emu["get /api/v1/namespaces/ml/pods/llm-1/log"] << pod_log
    async with operator(api):
        await api.must("POST", model_path(), model_body(checkpoint=S3))
        running = fetch_pod("llm-1", {"running": {"startedAt": NOW}})
        await api.must("POST", POD, {**running, "apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": "llm-1", "namespace": "ml", "labels": LABELS}})

        async def fetch_with(key: str, value: Any = None) -> dict[str, Any] | None:
            fetch = (await model_status(api)).get("fetch") or {}
            return fetch if key in fetch and value in (None, fetch[key]) else None

        first = await eventually(lambda: fetch_with("pod"), what="status.fetch while the prose-only log is read")
        assert first["phase"] == "Fetching" and "doneBytes" not in first
        log["text"] += progress_line(3 << 20, 8 << 20) + "\n" + prose("3.0 MiB") + "\n"
        fetch = await eventually(lambda: fetch_with("doneBytes", 3 << 20), what="status.fetch.doneBytes")
        assert fetch == {"phase": "Fetching", "uri": S3["uri"], "pod": "llm-1", "doneBytes": 3 << 20,
                         "totalBytes": 8 << 20, "rateBytesPerSecond": 1000, "etaSeconds": 2}
        assert served[-1] == {"container": "fetch", "tailLines": str(TAIL_LINES), "limitBytes": "8192"}
