"""server/admission.py: one caller's big batches cannot starve another caller's small request."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from server import keys
from server.admission import FairAdmission, default_rows_per_caller
from server.errors import Overloaded
from server_helpers import wait_for


def test_default_share_leaves_room_for_others():
    assert [default_rows_per_caller(b) for b in (1, 2, 4, 8, 32)] == [1, 1, 3, 7, 28]


async def test_waiting_callers_are_served_in_turn():
    fair = FairAdmission(per_caller=1, max_waiting=10)
    order: list[str] = []
    release = {c: asyncio.Event() for c in ("a1", "a2", "a3", "b1", "c1")}

    async def request(caller: str, name: str):
        async with fair.slots(caller, 1):
            order.append(name)
            await release[name].wait()

    tasks = [asyncio.create_task(request(n[0], n)) for n in ("a1", "a2", "a3", "b1", "c1")]
    await wait_for(lambda: order == ["a1", "b1", "c1"], what="one request per caller admitted")
    release["a1"].set()
    await wait_for(lambda: order[-1] == "a2", what="a's next request")
    release["b1"].set()
    release["c1"].set()
    release["a2"].set()
    release["a3"].set()
    await asyncio.gather(*tasks)
    assert order == ["a1", "b1", "c1", "a2", "a3"] and fair.held == {} and fair.waiting == 0


async def test_a_cancelled_waiter_leaves_the_line_and_a_full_line_is_overloaded():
    fair = FairAdmission(per_caller=1, max_waiting=1)
    gate = asyncio.Event()

    async def hold():
        async with fair.slots("a", 1):
            await gate.wait()

    first = asyncio.create_task(hold())
    await wait_for(lambda: fair.held == {"a": 1}, what="first admitted")
    second = asyncio.create_task(hold())
    await wait_for(lambda: fair.waiting == 1, what="second waiting")
    with pytest.raises(Overloaded, match="MAX_QUEUE=1"):
        await fair._acquire("a", 1)  # a third of a's: its line is full (b would get in)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert fair.waiting == 0
    gate.set()
    await first
    assert fair.held == {}


async def test_a_batch_hog_does_not_starve_a_small_request(make_client, config, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("hog\nsmall\n")
    client = await make_client(dataclasses.replace(config, api_keys_file=str(keys_file)))  # 4 rows: 3 per caller
    engine = client.server.app[keys.LIFECYCLE].engine
    big = {"prompts": ["a", "b", "c"], "params": {"max_length": 1000, "temperature": 1.0}}
    hogs = [asyncio.create_task(client.post("/batch_generate", json=big, headers={"X-API-Key": "hog"}))
            for _ in range(2)]
    await wait_for(lambda: engine.stats().running == 3, what="the hog's first batch running")
    resp = await client.post("/generate", json={"prompt": "a", "max_length": 8}, headers={"X-API-Key": "small"})
    assert resp.status == 200 and (await resp.json())["tokens_generated"] == 8
    assert not any(h.done() for h in hogs)  # served while the hog's first batch still runs
    for h in hogs:
        h.cancel()
    await asyncio.gather(*hogs, return_exceptions=True)


async def test_prompts_per_request_have_their_own_limit(make_client, config):
    client = await make_client(dataclasses.replace(config, max_prompts_per_request=2))
    resp = await client.post("/batch_generate", json={"prompts": ["a", "b", "c"]})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == "prompts" and "at most 2 prompts" in err["message"]


async def test_rows_per_caller_follow_the_fairness_header(make_client, config):
    from server.config import FAIRNESS_HEADER

    client = await make_client(dataclasses.replace(config, rate_limit_key=FAIRNESS_HEADER))  # 3 rows per caller
    engine = client.server.app[keys.LIFECYCLE].engine
    big = {"prompts": ["a", "b", "c"], "params": {"max_length": 1000, "temperature": 1.0}}
    hogs = [asyncio.create_task(client.post("/batch_generate", json=big, headers={FAIRNESS_HEADER: "hog"}))
            for _ in range(2)]
    await wait_for(lambda: engine.stats().running == 3, what="the hog's first batch running")
    resp = await client.post("/generate", json={"prompt": "a", "max_length": 8}, headers={FAIRNESS_HEADER: "small"})
    assert resp.status == 200 and (await resp.json())["tokens_generated"] == 8
    assert not any(h.done() for h in hogs)  # one client address, two tenants: served in turn
    for h in hogs:
        h.cancel()
    await asyncio.gather(*hogs, return_exceptions=True)
