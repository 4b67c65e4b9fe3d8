"""client.py at operator shutdown: close() lets requests in flight finish, then refuses new ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from operator_helpers import eventually, serve_loopback

from nanogpt_operator.client import KubeClient
from nanogpt_operator.errors import ClientClosedError


@pytest.fixture
async def slow_api() -> AsyncIterator[dict[str, Any]]:
    """A loopback API server whose Deployment GET waits until the test releases it."""
    state: dict[str, Any] = {"entered": asyncio.Event(), "release": asyncio.Event()}

    async def get(request: web.Request) -> web.Response:
        state["entered"].set()
        await state["release"].wait()
        return web.json_response({"kind": "Deployment", "metadata": {"name": "llm"}})

    app = web.Application()
    app.router.add_get("/apis/apps/v1/namespaces/ml/deployments/llm", get)
    async with serve_loopback(app) as url:
        state["url"] = url
        yield state


async def test_close_waits_for_the_request_in_flight(slow_api) -> None:
    client = KubeClient(aiohttp.ClientSession(), slow_api["url"], lambda: None, "test")
    in_flight = asyncio.create_task(client.get("Deployment", "ml", "llm"))
    await slow_api["entered"].wait()
    closing = asyncio.create_task(client.close())

    async def refusing() -> bool:
        return client.closed

    await eventually(refusing, what="close() to start")  # from here on it must refuse new requests
    with pytest.raises(ClientClosedError):
        await client.get("Deployment", "ml", "other")
    slow_api["release"].set()
    # The request that was in flight when the operator began to stop completes, instead of failing
    # with aiohttp's "Connector is closed".
    assert (await in_flight)["metadata"]["name"] == "llm"
    await closing
    assert client.closed


async def test_close_gives_up_on_a_hung_request(slow_api) -> None:
    client = KubeClient(aiohttp.ClientSession(), slow_api["url"], lambda: None, "test")
    in_flight = asyncio.create_task(client.get("Deployment", "ml", "llm"))
    await slow_api["entered"].wait()
    await client.close(wait_s=0.2)
    with pytest.raises(ClientClosedError):  # typed: the handler ends quietly, no "Connector is closed"
        await in_flight
    slow_api["release"].set()
