"""One tick of one NanoGPTRollout: observe, act on the persisted status, smoke-test, decide, report.

The decisions are state_machine.py's pure functions; this module does the I/O around them and is the one
boundary between the rollout logic and kopf (errors become kopf.PermanentError/TemporaryError here).

Staleness fence: kopf hands a timer the body it last saw on the watch stream, which can lag behind the
status this process just wrote. Each write bumps `status.revision`, the runtime remembers the last one
per rollout, and a tick that sees an older revision waits for the watch to catch up instead of deciding
on an old status. After a restart the memory is empty and the freshly listed body is trusted.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from nanogpt_operator.api import ROLLOUT_KIND
from nanogpt_operator.errors import ApiError, ClientClosedError, ConflictError, SpecError, TransientApiError
from nanogpt_operator.metrics import OperatorMetrics
from nanogpt_operator.rollout import state_machine as machine
from nanogpt_operator.rollout.client import RolloutClient
from nanogpt_operator.rollout.model_view import LOCK_ANNOTATION, model_view, selected_keys
from nanogpt_operator.rollout.smoke import SmokeTest
from nanogpt_operator.rollout.spec import URI_FIELDS, RolloutSpec, parse_rollout
from nanogpt_operator.rollout.waves import Key

TRANSIENT_DELAY_S = 10
# A status patch kopf failed to send must not silence the rollout forever: trust the body after this.
STALE_GRACE_S = 30.0


@dataclass
class RolloutRuntime:
    """Loop-bound objects of the rollout controller, created in its startup handler (kopf memo)."""

    client: RolloutClient
    smoke: SmokeTest
    # rollout uid -> (last status.revision written, when): the staleness fence of `run`.
    written: dict[str, tuple[int, float]] = field(default_factory=dict)
    metrics: OperatorMetrics | None = None

    def stale(self, uid: str, revision: int) -> bool:
        """The body shows an older status than we wrote, and not for so long that the write may have failed."""
        last, when = self.written.get(uid, (0, 0.0))
        return revision < last and time.monotonic() - when < STALE_GRACE_S

    def wrote(self, uid: str, revision: int) -> None:
        self.written[uid] = (revision, time.monotonic())


# Every field a NanoGPTModel's spec.checkpoint may hold: a merge patch nulls those the new form lacks.
CHECKPOINT_KEYS = ("claimName", "path", "create", *URI_FIELDS)


def checkpoint_patch(action: machine.SetCheckpoint) -> dict[str, Any]:
    """spec.checkpoint for a merge patch: the new form's fields, and null for the other form's."""
    if action.fields is not None:
        wanted = dict(action.fields)
    else:
        wanted = {"path": action.path, **({"claimName": action.claim} if action.claim else {})}
    cleared = {k: None for k in CHECKPOINT_KEYS if k not in wanted}
    if action.fields is None:
        cleared = {k: None for k in URI_FIELDS}  # to a path: the claim (and create) stay as they are
    return {**cleared, **wanted}


def model_patch(action: machine.Action, rollout: str, resource_version: str | None) -> dict[str, Any]:
    """The merge patch for one action; the lock travels with every write, so no write lacks it."""
    if isinstance(action, machine.Unlock):
        meta: dict[str, Any] = {"annotations": {LOCK_ANNOTATION: None}}
    else:
        meta = {"annotations": {LOCK_ANNOTATION: rollout}}
    if resource_version:
        meta["resourceVersion"] = resource_version
    patch: dict[str, Any] = {"metadata": meta}
    if isinstance(action, machine.SetCheckpoint):
        patch["spec"] = {"checkpoint": checkpoint_patch(action)}
    return patch


async def execute(client: RolloutClient, rollout: str, actions: list[machine.Action],
                  world: machine.World, logger: kopf.Logger) -> int:
    """Send each write; a lost race (409) or a vanished model (404) waits for the next tick. Returns writes."""
    sent = 0
    for action in actions:
        view = world.models.get(action.key)
        resource_version = view.resource_version if view is not None else None
        try:
            await client.patch_model(*action.key, model_patch(action, rollout, resource_version))
            sent += 1
        except ConflictError:
            logger.info("%s/%s changed under us; will look again", *action.key)
        except ApiError as err:
            if err.status != 404:
                raise
    return sent


async def observe(client: RolloutClient, spec: RolloutSpec) -> tuple[machine.World, dict[Key, dict[str, Any]]]:
    """The world for one tick (without smoke results) and the raw models, for Events on them."""
    raw = {(m["metadata"].get("namespace", ""), m["metadata"]["name"]): m for m in await client.list_models()}
    views = {k: model_view(m) for k, m in raw.items()}
    labels = await client.namespace_labels() if spec.namespace_selector is not None else {}
    rollouts = frozenset(r["metadata"]["name"] for r in await client.list_rollouts())
    return machine.World(views, selected_keys(spec, list(views.values()), labels), rollouts), raw


async def smoke_all(runtime: RolloutRuntime, spec: RolloutSpec, status: Mapping[str, Any],
                    world: machine.World) -> dict[Key, machine.SmokeResult]:
    candidates = machine.smoke_candidates(spec, status, world)
    if not candidates or spec.smoke is None:
        return {}
    gate = spec.smoke

    async def one(key: Key, endpoint: str) -> machine.SmokeResult:
        view = world.models[key]
        if view.api_key_secret is None:
            return await runtime.smoke(endpoint, gate)
        secret, item = view.api_key_secret
        api_key = await runtime.client.api_key(key[0], secret, item)
        if api_key is None:
            return machine.SmokeResult(False, f"no API key in Secret {key[0]}/{secret} (key {item!r}) "
                                              "named by spec.server.apiKeySecretRef")
        return await runtime.smoke(endpoint, gate, api_key)

    results = await asyncio.gather(*(one(key, endpoint) for key, endpoint in candidates))
    return {key: result for (key, _), result in zip(candidates, results)}


async def tick(runtime: RolloutRuntime, body: Mapping[str, Any], now: datetime.datetime,
               logger: kopf.Logger) -> tuple[machine.Step, dict[Key, dict[str, Any]], bool]:
    """Act on the persisted status, then decide the next one. Returns (step, raw models, quiet)."""
    spec = parse_rollout(body)
    status = body.get("status") or {}
    world, raw = await observe(runtime.client, spec)
    writes = machine.actions(spec, status, world)
    if writes and await execute(runtime.client, spec.name, writes, world, logger):
        world, raw = await observe(runtime.client, spec)  # decide on what we just wrote
    world = machine.World(world.models, world.selected, world.rollouts, await smoke_all(runtime, spec, status, world))
    generation = int((body.get("metadata") or {}).get("generation") or 1)
    step = machine.advance(spec, status, world, now, generation)
    quiet = status.get("phase") in machine.TERMINAL and not machine.actions(spec, step.status, world)
    return step, raw, quiet


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _post(event: machine.Event, body: kopf.Body, raw: Mapping[Key, Mapping[str, Any]], logger: kopf.Logger) -> None:
    # info, not warning: kopf would post a warning log line as a second, duplicate Event.
    logger.info("%s %s: %s", event.type, event.reason, event.message)
    kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    model = raw.get(event.key) if event.key is not None else None
    if model is not None:
        kopf.event(model, type=event.type, reason=event.reason,
                   message=f"rollout {body.metadata.name}: {event.message}")


# Event reason -> (counter, result label): what the operator's metrics record of a tick's Events.
_COUNTED = {"WaveComplete": ("rollout_waves", "complete"), "RolloutFailed": ("rollout_waves", "failed"),
            "Succeeded": ("rollouts", "succeeded"), "RolledBack": ("rollouts", "reverted")}


def count(metrics: OperatorMetrics | None, body: kopf.Body, events: tuple[machine.Event, ...] | None) -> None:
    """One tick in the metrics: ok or error, waves finished, rollouts ended (failed also ends a wave)."""
    if metrics is None:
        return
    metrics.reconciles.labels(kind=ROLLOUT_KIND, result="error" if events is None else "ok").inc()
    names = {"namespace": body.metadata.namespace or "", "name": body.metadata.name}
    for event in events or ():
        counter, result = _COUNTED.get(event.reason, (None, ""))
        if counter == "rollout_waves":
            metrics.rollout_waves.labels(**names, result=result).inc()
        elif counter == "rollouts":
            metrics.rollouts.labels(**names, outcome=result).inc()
        if event.reason == "RolloutFailed":
            metrics.rollouts.labels(**names, outcome="failed").inc()


async def run(runtime: RolloutRuntime, body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger) -> None:
    """One timer tick for kopf, counted in the operator's metrics (see `_tick`)."""
    events: tuple[machine.Event, ...] | None = None
    try:
        events = await _tick(runtime, body, patch, logger)
    finally:
        count(runtime.metrics, body, events)


async def _tick(runtime: RolloutRuntime, body: kopf.Body, patch: kopf.Patch,
                logger: kopf.Logger) -> tuple[machine.Event, ...]:
    """Status through kopf's patch, Events, errors mapped to kopf's types; returns the Events posted."""
    status = body.status
    uid = str(body.metadata.uid)
    if status.get("phase") in machine.TERMINAL and status.get("locksReleased"):
        return ()  # finished, and no model carries our lock: nothing left to do
    revision = int(status.get("revision") or 0)
    if runtime.stale(uid, revision):
        logger.debug("status revision %s is older than the one written; waiting for the watch", revision)
        return ()
    try:
        step, raw, quiet = await tick(runtime, body, _now(), logger)
    except SpecError as err:
        if status.get("invalidSpec") != str(err):
            kopf.warn(body, reason="InvalidSpec", message=str(err))
            patch.status.update({"invalidSpec": str(err), "message": f"invalid spec: {err}",
                                 "revision": revision + 1})
            runtime.wrote(uid, revision + 1)
        raise kopf.PermanentError(f"invalid spec: {err}") from err
    except ClientClosedError:
        logger.info("the operator is stopping; this tick ends here")
        return ()
    except TransientApiError as err:
        raise kopf.TemporaryError(f"Kubernetes API: {err}", delay=TRANSIENT_DELAY_S) from err
    except ApiError as err:  # 403 and friends: a person must fix RBAC; keep retrying slowly
        raise kopf.TemporaryError(f"Kubernetes API: {err}", delay=6 * TRANSIENT_DELAY_S) from err
    new_status = {**step.status, "revision": revision + 1, "invalidSpec": None, "locksReleased": quiet or None}
    patch.status.update(new_status)
    runtime.wrote(uid, revision + 1)
    for event in step.events:
        _post(event, body, raw, logger)
    return tuple(step.events)


async def release(runtime: RolloutRuntime, body: kopf.Body, logger: kopf.Logger) -> None:
    """The rollout is being deleted: drop its locks and leave every model on the checkpoint it has now."""
    name = body.metadata.name
    held = [m for m in await runtime.client.list_models()
            if (m["metadata"].get("annotations") or {}).get(LOCK_ANNOTATION) == name]
    for m in held:
        meta = m["metadata"]
        try:
            await runtime.client.patch_model(meta["namespace"], meta["name"],
                                             {"metadata": {"annotations": {LOCK_ANNOTATION: None}}})
        except ApiError as err:
            if err.status != 404:
                raise kopf.TemporaryError(f"releasing {meta['namespace']}/{meta['name']}: {err}",
                                          delay=TRANSIENT_DELAY_S) from err
    runtime.written.pop(str(body.metadata.uid), None)
    logger.info("deleted: released %d models, each left on the checkpoint it has", len(held))
