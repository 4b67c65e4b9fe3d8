"""kopf registrations of the NanoGPTRollout controller, and nothing else (see reconcile.py).

A timer drives each rollout's state machine (level-based: every tick re-measures the models); deleting a
rollout only drops its locks and leaves every model on the checkpoint it has at that moment. No handler
needs a finalizer, so a rollout deleted while the operator is down still goes: the locks it leaves name a
rollout that no longer exists, and every other rollout treats such a lock as free.

`register` takes the registry, the tick interval and, for tests, how to build the API client and the
smoke test; importing this module fills kopf's default registry, as model/handlers.py does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from nanogpt_operator.api import GROUP, ROLLOUT_PLURAL, VERSION, rollouts_path
from nanogpt_operator.config import load_config
from nanogpt_operator.metrics import shared_metrics
from nanogpt_operator.rollout.client import RolloutClient
from nanogpt_operator.rollout.reconcile import RolloutRuntime, release, run
from nanogpt_operator.rollout.smoke import HttpSmokeTest, SmokeTest
from nanogpt_operator.timers import Resync, register_resync

# A wave's gates are re-checked this often; pauses and deadlines are in seconds to minutes.
TICK_SECONDS = 10.0


async def connect_from_environment() -> RolloutClient:
    client: RolloutClient = await RolloutClient.connect(load_config())
    return client


def register(registry: kopf.OperatorRegistry, *, interval: float = TICK_SECONDS,
             connect: Callable[[], Awaitable[RolloutClient]] = connect_from_environment,
             smoke: Callable[[], SmokeTest] = HttpSmokeTest.create) -> None:
    """Register the rollout controller's handlers into `registry`."""

    @kopf.on.startup(registry=registry)
    async def rollout_startup(memo: kopf.Memo, **_: Any) -> None:
        memo.rollouts = RolloutRuntime(client=await connect(), smoke=smoke(), metrics=shared_metrics(memo))

    @kopf.on.cleanup(registry=registry)
    async def rollout_cleanup(memo: kopf.Memo, **_: Any) -> None:
        if "rollouts" in memo:
            await memo.rollouts.client.close()
            close = getattr(memo.rollouts.smoke, "close", None)
            if close is not None:
                await close()

    register_resync(GROUP, VERSION, ROLLOUT_PLURAL, registry=registry,
                    resync=lambda memo: rollout_resync(memo.rollouts, interval))

    # The DELETED watch event, not @kopf.on.delete: that one would put a blocking finalizer on every rollout.
    @kopf.on.event(GROUP, VERSION, ROLLOUT_PLURAL, registry=registry)
    async def rollout_delete(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
                             **_: Any) -> None:
        if event.get("type") == "DELETED":
            await release(memo.rollouts, body, logger)


def rollout_resync(runtime: RolloutRuntime, interval: float) -> Resync:
    """One tick of a rollout's state machine per round; the status it decides is written by the loop."""
    async def tick(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger) -> None:
        await run(runtime, body, patch, logger)

    async def write_status(body: kopf.Body, status: Mapping[str, Any]) -> None:
        await runtime.client.patch_status(f"{rollouts_path()}/{body.metadata.name}", status)

    return Resync(tick, write_status, interval=interval)


register(kopf.get_default_registry())
