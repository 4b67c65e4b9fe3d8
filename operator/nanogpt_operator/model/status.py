"""Pure derivation of a NanoGPTModel's status from its live children.

Phases: Pending (nothing ready yet), Progressing (a rollout is under way), Ready (every replica runs the
current template), Degraded (a rollout missed its deadline, replicas are failing, or the operator rolled
back), Failed (the spec cannot work). Reasons for trouble are copied from the pods, because "0/3 nodes have
nvidia.com/gpu" or "OOMKilled" is what a person can act on, and a Deployment's own status never says it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from nanogpt_operator.conditions import condition
from nanogpt_operator.model.build import CHECKPOINT_ANNOTATION, endpoint, pod_labels
from nanogpt_operator.model.fetch_status import FetchProgress, FetchState, fetch_state
from nanogpt_operator.model.spec import ModelSpec

# Waiting reasons that mean the container will not start by itself; ordered by what to fix first.
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError", "CrashLoopBackOff")


@dataclass(frozen=True)
class Problem:
    """Why a pod is not serving, as its kubelet or scheduler said."""

    reason: str
    message: str
    pod: str


@dataclass(frozen=True)
class DeploymentState:
    """The facts status and rollback need from a live Deployment."""

    desired: int
    replicas: int
    ready: int
    updated: int
    complete: bool
    steady: bool  # the Deployment finished its last rollout (pods may have failed since)
    deadline_exceeded: bool
    checkpoint: str | None
    image: str | None


def _container_problems(pod: str, status: Mapping[str, Any]) -> list[Problem]:
    problems = []
    last = (status.get("lastState") or {}).get("terminated") or {}
    now = (status.get("state") or {}).get("terminated") or {}
    if "OOMKilled" in (last.get("reason"), now.get("reason")):
        problems.append(Problem("OOMKilled", "the server ran out of memory; raise spec.resources.limits.memory "
                                             "or use a smaller model/dtype", pod))
    waiting = (status.get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in STUCK_REASONS:
        problems.append(Problem(waiting["reason"], waiting.get("message") or waiting["reason"], pod))
    return problems


def pod_problems(pods: Sequence[Mapping[str, Any]]) -> list[Problem]:
    """Distinct problems of the pods, most actionable first (unschedulable, OOM, image, crash)."""
    found: list[Problem] = []
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                found.append(Problem(cond.get("reason") or "Unschedulable", cond.get("message") or "", name))
        fetch = fetch_state([pod])
        if fetch is not None and fetch.phase == "Failed":
            found.append(Problem("FetchFailed", f"{fetch.reason}: {fetch.message}", name))
        for container in status.get("containerStatuses") or []:
            found.extend(_container_problems(name, container))
    order = ("Unschedulable", "FetchFailed", "OOMKilled", *STUCK_REASONS)
    unique = {p.reason: p for p in reversed(found)}  # keep the first pod's message per reason
    return sorted(unique.values(), key=lambda p: order.index(p.reason) if p.reason in order else len(order))


def _condition(dep_status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    return next((c for c in dep_status.get("conditions") or [] if c.get("type") == kind), {})


def deployment_state(deployment: Mapping[str, Any]) -> DeploymentState:
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    meta = deployment.get("metadata") or {}
    desired = int(spec.get("replicas", 1))
    ready, updated = int(status.get("readyReplicas", 0)), int(status.get("updatedReplicas", 0))
    replicas = int(status.get("replicas", 0))
    observed = int(status.get("observedGeneration", 0)) >= int(meta.get("generation", 0))
    progressing = _condition(status, "Progressing")
    template = spec.get("template") or {}
    containers = (template.get("spec") or {}).get("containers") or [{}]
    return DeploymentState(
        desired=desired, replicas=replicas, ready=ready, updated=updated,
        # Old pods must be gone too (replicas == desired), or some traffic still hits the old checkpoint.
        complete=observed and updated >= desired and ready >= desired and replicas == desired,
        steady=progressing.get("reason") == "NewReplicaSetAvailable",
        deadline_exceeded=progressing.get("status") == "False"
        and progressing.get("reason") == "ProgressDeadlineExceeded",
        checkpoint=((template.get("metadata") or {}).get("annotations") or {}).get(CHECKPOINT_ANNOTATION),
        image=containers[0].get("image"),
    )


def _problem_text(problems: Sequence[Problem]) -> str:
    return "; ".join(f"{p.reason} ({p.pod}): {p.message}" for p in problems)


@dataclass(frozen=True)
class Verdict:
    phase: str
    ready: tuple[bool, str, str]
    progressing: tuple[bool, str, str]
    degraded: tuple[bool, str, str]


def _verdict(rs: DeploymentState | None, problems: Sequence[Problem], rollback: Mapping[str, Any] | None,
             deadline: int, has_good: bool) -> Verdict:
    ok = (False, "AsExpected", "")
    if rs is None:
        return Verdict("Pending", (False, "Creating", "the Deployment does not exist yet"),
                       (True, "Creating", "creating the Deployment"), ok)
    ready = (rs.complete, "RolloutComplete" if rs.complete else "ReplicasNotReady",
             f"{rs.ready}/{rs.desired} replicas ready" + (" (scaled to zero)" if rs.desired == 0 else ""))
    done = (False, "RolloutComplete", "every replica runs the current template")
    if rollback is not None:
        return Verdict("Degraded", ready, done if rs.complete else (True, "RollingBack", rollback["message"]),
                       (True, "RolledBack", rollback["message"]))
    if rs.complete:
        return Verdict("Ready", ready, done, ok)
    reason = problems[0].reason if problems else None
    if rs.deadline_exceeded:
        text = f"new pods not ready within {deadline}s" + (f": {_problem_text(problems)}" if problems else "")
        return Verdict("Degraded", ready, (False, "ProgressDeadlineExceeded", text),
                       (True, reason or "ProgressDeadlineExceeded", text))
    if rs.steady and rs.updated >= rs.desired:  # nothing is rolling, yet replicas are down
        text = _problem_text(problems) or f"{rs.ready}/{rs.desired} replicas ready"
        return Verdict("Degraded", ready, done, (True, reason or "ReplicasUnavailable", text))
    text = f"{rs.updated}/{rs.desired} replicas updated, {rs.ready} ready"
    text += f"; waiting on {_problem_text(problems)}" if problems else ""
    phase = "Progressing" if rs.ready > 0 or has_good else "Pending"
    return Verdict(phase, ready, (True, reason or "RollingOut", text), ok)


def derive_status(m: ModelSpec, generation: int, deployment: Mapping[str, Any] | None,
                  pods: Sequence[Mapping[str, Any]], previous: Mapping[str, Any],
                  rollback: Mapping[str, Any] | None, now: str,
                  progress: FetchProgress | None = None) -> dict[str, Any]:
    """The whole status subresource for one reconcile, from the live Deployment and its pods.

    `progress`: what the fetching pod's log says (model/fetch_progress.py), for status.fetch's bytes."""
    rs = deployment_state(deployment) if deployment is not None else None
    good_ckpt, good_image = previous.get("lastGoodCheckpoint"), previous.get("lastGoodImage")
    if rs is not None and rs.complete and rs.desired > 0 and rollback is None:
        good_ckpt, good_image = rs.checkpoint, rs.image  # proven: every replica served it
    verdict = _verdict(rs, pod_problems(pods), rollback, m.progress_deadline_seconds, bool(good_ckpt))
    fetch = fetch_state(pods) if m.checkpoint.uri else None
    if fetch is not None and fetch.phase == "Fetching" and progress is not None:
        fetch = replace(fetch, progress=progress)
    old = previous.get("conditions") or []
    conditions = [condition("Ready", *verdict.ready, generation, old, now),
                  condition("Progressing", *verdict.progressing, generation, old, now),
                  condition("Degraded", *verdict.degraded, generation, old, now)]
    phase = verdict.phase
    if m.checkpoint.uri:
        conditions.append(condition("Fetched", *_fetched(fetch, m.checkpoint.display), generation, old, now))
        if phase in ("Pending", "Progressing") and (rs is None or rs.ready == 0) and fetch is not None:
            phase = {"Fetching": "Fetching", "Failed": "Degraded"}.get(fetch.phase, phase)
        if fetch is not None and fetch.phase == "Failed" and phase == "Degraded":
            conditions[2] = condition("Degraded", True, "FetchFailed", _fetched(fetch, m.checkpoint.display)[2],
                                      generation, old, now)
    return {
        "phase": phase,
        "observedGeneration": generation,
        "source": m.checkpoint.display,
        "fetch": fetch.as_status(m.checkpoint.display) if fetch is not None else None,
        "replicas": rs.replicas if rs else 0,
        "readyReplicas": rs.ready if rs else 0,
        "updatedReplicas": rs.updated if rs else 0,
        "servedCheckpoint": rs.checkpoint if rs else None,
        "lastGoodCheckpoint": good_ckpt,
        "lastGoodImage": good_image,
        "endpoint": endpoint(m),
        "selector": ",".join(f"{k}={v}" for k, v in sorted(pod_labels(m.name).items())),
        "rollback": dict(rollback) if rollback is not None else None,
        "conditions": conditions,
    }


def _fetched(fetch: FetchState | None, uri: str) -> tuple[bool, str, str]:
    """The Fetched condition of a model with a remote checkpoint."""
    if fetch is None:
        return False, "Waiting", f"no pod has started fetching {uri} yet"
    if fetch.phase == "Fetched":
        return True, "Fetched", f"{uri} fetched ({fetch.pod}), sha256 {fetch.sha256 or 'unknown'}"
    if fetch.phase == "Fetching":
        done = fetch.progress
        so_far = "" if done is None else f" ({done.done_bytes} of {done.total_bytes or '?'} bytes)"
        return False, "Fetching", f"{fetch.pod} is fetching {uri}{so_far}"
    retry = "; the kubelet retries it" if fetch.retryable else "; retrying will not help: fix the spec or the source"
    return False, "FetchFailed", f"fetching {uri} failed in {fetch.pod}: {fetch.reason}: {fetch.message}{retry}"


def invalid_spec_status(path: str, problem: str, generation: int, previous: Mapping[str, Any],
                        now: str) -> dict[str, Any]:
    """Status for a spec the operator refuses; children keep running what they ran."""
    old = previous.get("conditions") or []
    message = f"{path}: {problem}"
    return {
        "phase": "Failed",
        "observedGeneration": generation,
        "conditions": [condition("Ready", False, "InvalidSpec", message, generation, old, now),
                       condition("Progressing", False, "InvalidSpec", message, generation, old, now),
                       condition("Degraded", True, "InvalidSpec", message, generation, old, now)],
    }
