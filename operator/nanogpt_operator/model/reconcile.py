"""One reconcile of one NanoGPTModel: parse, build, apply, measure, decide, report.

Handlers call `reconcile_model`; it returns the status to write and the Events to post, and raises only
the typed errors of `errors.py`. Translating those into kopf's retry semantics happens in `run`, the one
boundary between this package's logic and kopf.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from nanogpt_operator.api import MODEL_KIND, models_path
from nanogpt_operator.client import KubeClient
from nanogpt_operator.config import OperatorConfig
from nanogpt_operator.errors import ApiError, ClientClosedError, SpecError, TransientApiError
from nanogpt_operator.metrics import OperatorMetrics
from nanogpt_operator.model.apply import Applied, apply, remove
from nanogpt_operator.model.build import (Owner, desired_children, desired_deployment, owner_of, pod_labels,
                                          unwanted_children)
from nanogpt_operator.model.drift import Path
from nanogpt_operator.model.fetch_progress import fetch_progress
from nanogpt_operator.model.integrations import apply_integrations, integrations_condition
from nanogpt_operator.model.rollback import decide_rollback, effective_spec, pinned_rollback
from nanogpt_operator.model.spec import ModelSpec, parse_model
from nanogpt_operator.model.status import deployment_state, derive_status, invalid_spec_status, pod_problems

TRANSIENT_DELAY_S = 10
# A 403 needs a person to fix RBAC; retry slowly rather than give up.
FORBIDDEN_DELAY_S = 60


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Outcome:
    status: dict[str, Any]
    events: tuple[Event, ...]


def _keep(m: ModelSpec, kind: str) -> frozenset[Path]:
    # Under an HPA the Deployment's replicas belong to the HPA after creation.
    return frozenset({("spec", "replicas")}) if kind == "Deployment" and m.autoscaling else frozenset()


async def apply_children(client: KubeClient, m: ModelSpec, owner: Owner) -> list[Applied]:
    results = []
    for obj in desired_children(m, owner):
        kind = obj["kind"]
        results.append(await apply(client, obj, keep=_keep(m, kind), create_only=kind == "PersistentVolumeClaim"))
    for kind, name in unwanted_children(m):
        removed = await remove(client, kind, m.namespace, name)
        if removed is not None:
            results.append(removed)
    return results


def events_for(results: list[Applied], restoring: bool) -> list[Event]:
    """`restoring`: a missing child was deleted by someone, not newly asked for by the spec."""
    events = []
    for r in results:
        if r.action == "unchanged":
            continue
        if r.drift:
            events.append(Event("Warning", "DriftCorrected",
                                f"{r.kind} {r.name} was edited outside the operator; restored {', '.join(r.paths)}"))
        elif restoring and r.action == "created":
            events.append(Event("Warning", "DriftCorrected", f"{r.kind} {r.name} was deleted; recreated it"))
        else:
            events.append(Event("Normal", r.action.capitalize(), r.describe()))
    return events


def generation_of(body: Mapping[str, Any]) -> int:
    return int((body.get("metadata") or {}).get("generation") or 1)


async def reconcile_model(client: KubeClient, body: Mapping[str, Any], *, resync: bool, now: str,
                          config: OperatorConfig = OperatorConfig()) -> Outcome:
    """Converge the children on the spec (or on a pinned rollback) and derive the status."""
    generation, previous = generation_of(body), body.get("status") or {}
    m, owner = parse_model(body, config), owner_of(body)
    rollback = pinned_rollback(previous, generation)
    target = effective_spec(m, rollback)
    results = await apply_children(client, target, owner)
    integrated = await apply_integrations(client, target, owner)
    results.extend(integrated.results)
    # The timer starts one period after creation, so a child it has to create was deleted by someone,
    # unless the spec changed since the last status (then the child may be newly asked for).
    restoring = resync and previous.get("observedGeneration", generation) == generation
    events = events_for(results, restoring=restoring)
    deployment = await client.get("Deployment", m.namespace, m.name)
    pods = await client.list("Pod", m.namespace, pod_labels(m.name))
    if resync and rollback is None and deployment is not None:
        rollback = decide_rollback(m, generation, deployment_state(deployment), pod_problems(pods), previous)
        if rollback is not None:
            target = effective_spec(m, rollback)
            await apply(client, desired_deployment(target, owner), keep=_keep(m, "Deployment"))
            events.append(Event("Warning", "RolledBack", rollback["message"]))
            deployment = await client.get("Deployment", m.namespace, m.name)
    progress = await fetch_progress(client, target, pods, config)
    status = derive_status(target, generation, deployment, pods, previous, rollback, now, progress)
    integrations = integrations_condition(target, integrated.missing, generation, previous, now)
    if integrations is not None:
        status["conditions"].append(integrations)
        if integrations["status"] == "False" and integrations["lastTransitionTime"] == now:
            events.append(Event("Warning", "CRDNotInstalled", integrations["message"]))
    return Outcome(status, tuple(events))


def _reported(body: kopf.Body) -> bool:
    status = body.status
    return status.get("phase") == "Failed" and status.get("observedGeneration") == generation_of(body)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def count(metrics: OperatorMetrics | None, body: kopf.Body, outcome: Outcome | None) -> None:
    """Record one reconcile in the operator's metrics: its result, drift repaired, rollbacks made."""
    if metrics is None:
        return
    metrics.reconciles.labels(kind=MODEL_KIND, result="error" if outcome is None else "ok").inc()
    for event in outcome.events if outcome is not None else ():
        if event.reason == "DriftCorrected":
            metrics.drift_repairs.labels(kind=MODEL_KIND).inc()
        elif event.reason == "RolledBack":
            metrics.rollbacks.labels(namespace=body.metadata.namespace, name=body.metadata.name).inc()


async def refresh_status(client: KubeClient, body: Mapping[str, Any], config: OperatorConfig) -> bool:
    """Re-derive a model's status from its live Deployment and pods, without writing any child.

    Called on its Deployment's watch events, so status (and the rollout gates that read it) follow the
    pods at once; the resync timer stays the safety net. True when the status changed and was written."""
    meta, previous = body.get("metadata") or {}, body.get("status") or {}
    generation = generation_of(body)
    try:
        m = parse_model(body, config)
    except SpecError:
        return False  # the Failed status of the spec handlers stands
    rollback = pinned_rollback(previous, generation)
    target = effective_spec(m, rollback)
    deployment = await client.get("Deployment", m.namespace, m.name)
    pods = await client.list("Pod", m.namespace, pod_labels(m.name))
    progress = await fetch_progress(client, target, pods, config)
    status = derive_status(target, generation, deployment, pods, previous, rollback, _now(), progress)
    # The Integrations condition is about children this path does not apply: the last reconcile's stands.
    integrations = [c for c in previous.get("conditions") or [] if c.get("type") == "Integrations"]
    status["conditions"].extend(integrations)
    if all(previous.get(k) == v for k, v in status.items()):
        return False
    await client.patch_status(models_path(m.namespace, meta["name"]), status)
    return True


async def run(client: KubeClient, body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, *, resync: bool,
              config: OperatorConfig = OperatorConfig(), metrics: OperatorMetrics | None = None) -> None:
    """Reconcile for kopf: write status through kopf's patch, post Events, map errors to kopf's types."""
    outcome: Outcome | None = None
    try:
        outcome = await _run(client, body, patch, logger, resync=resync, config=config)
    finally:
        count(metrics, body, outcome)


async def _run(client: KubeClient, body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, *,
               resync: bool, config: OperatorConfig) -> Outcome | None:
    now = _now()
    try:
        outcome = await reconcile_model(client, body, resync=resync, now=now, config=config)
    except SpecError as err:
        # Nothing was applied: parsing comes before every write.
        if resync and _reported(body):
            return None  # said once per generation; the timer must not repeat the Event every interval
        patch.status.update(invalid_spec_status(err.path, err.problem, generation_of(body), body.status, now))
        kopf.warn(body, reason="InvalidSpec", message=str(err))
        raise kopf.PermanentError(f"invalid spec: {err}") from err
    except ClientClosedError:
        logger.info("the operator is stopping; this reconcile ends here")
        return None
    except TransientApiError as err:
        raise kopf.TemporaryError(f"Kubernetes API: {err}", delay=TRANSIENT_DELAY_S) from err
    except ApiError as err:
        if err.status == 422:  # the API rejected what the spec produced (e.g. a malformed affinity)
            if resync and _reported(body):
                return None  # as for an invalid spec: one Warning per generation, not one per resync
            patch.status.update(invalid_spec_status("spec", err.message, generation_of(body), body.status, now))
            kopf.warn(body, reason="Rejected", message=str(err))
            raise kopf.PermanentError(f"the API rejected a child: {err}") from err
        raise kopf.TemporaryError(f"Kubernetes API: {err}", delay=FORBIDDEN_DELAY_S) from err
    patch.status.update(outcome.status)
    for event in outcome.events:
        logger.info(event.message)
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    return outcome
