"""status.py: phases, conditions and reasons copied from pods."""

from __future__ import annotations

from typing import Any

from nanogpt_operator.model.build import Owner, desired_deployment
from nanogpt_operator.model.spec import parse_model
from nanogpt_operator.model.status import deployment_state, derive_status, invalid_spec_status, pod_problems

NOW = "2026-01-01T00:00:00Z"
OWNER = Owner(name="llm", uid="u")


def live(model_body, *, ready: int, updated: int, replicas: int, reason: str = "NewReplicaSetAvailable",
         progressing: str = "True", desired: int = 2) -> dict[str, Any]:
    d = desired_deployment(parse_model(model_body(replicas=desired)), OWNER)
    d["metadata"]["generation"] = 3
    d["status"] = {"observedGeneration": 3, "replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
                   "conditions": [{"type": "Progressing", "status": progressing, "reason": reason}]}
    return d


def pod(name: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": status}


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_pod_problems_are_ordered_by_what_to_fix_first() -> None:
    pods = [
        pod("a", containerStatuses=[{"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                                     "lastState": {"terminated": {"reason": "OOMKilled"}}}]),
        pod("b", containerStatuses=[{"state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]),
        pod("c", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                              "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]),
        pod("d", containerStatuses=[{"state": {"running": {}}}]),
    ]
    problems = pod_problems(pods)
    assert [p.reason for p in problems] == ["Unschedulable", "OOMKilled", "ImagePullBackOff", "CrashLoopBackOff"]
    assert "nvidia.com/gpu" in problems[0].message and problems[0].pod == "c"


def test_no_deployment_is_pending(model_body) -> None:
    status = derive_status(parse_model(model_body()), 1, None, [], {}, None, NOW)
    assert status["phase"] == "Pending" and status["replicas"] == 0
    assert status["endpoint"] == "http://llm.ml.svc.cluster.local:80"
    assert status["selector"] == "app.kubernetes.io/instance=llm,app.kubernetes.io/name=nanogpt"


def test_complete_rollout_is_ready_and_recorded_as_good(model_body) -> None:
    m = parse_model(model_body(replicas=2))
    status = derive_status(m, 3, live(model_body, ready=2, updated=2, replicas=2), [], {}, None, NOW)
    assert status["phase"] == "Ready"
    assert conditions(status) == {"Ready": ("True", "RolloutComplete"), "Progressing": ("False", "RolloutComplete"),
                                  "Degraded": ("False", "AsExpected")}
    assert status["lastGoodCheckpoint"] == status["servedCheckpoint"] == "log/model_40000.pt"
    assert status["lastGoodImage"] == "nanogpt-server:latest"
    assert (status["readyReplicas"], status["updatedReplicas"], status["observedGeneration"]) == (2, 2, 3)


def test_old_pods_still_running_is_not_complete(model_body) -> None:
    rs = deployment_state(live(model_body, ready=2, updated=2, replicas=3, reason="ReplicaSetUpdated"))
    assert not rs.complete


def test_first_rollout_waiting_on_pods_is_pending_with_the_reason(model_body) -> None:
    m = parse_model(model_body(replicas=2))
    pods = [pod("p", containerStatuses=[{"state": {"waiting": {"reason": "ErrImagePull", "message": "denied"}}}])]
    status = derive_status(m, 3, live(model_body, ready=0, updated=1, replicas=1, reason="ReplicaSetUpdated"),
                           pods, {}, None, NOW)
    assert status["phase"] == "Pending"
    assert conditions(status)["Progressing"] == ("True", "ErrImagePull")


def test_later_rollout_is_progressing(model_body) -> None:
    m = parse_model(model_body(replicas=2))
    status = derive_status(m, 3, live(model_body, ready=1, updated=1, replicas=2, reason="ReplicaSetUpdated"), [],
                           {"lastGoodCheckpoint": "old.pt", "lastGoodImage": "i"}, None, NOW)
    assert status["phase"] == "Progressing" and status["lastGoodCheckpoint"] == "old.pt"


def test_deadline_exceeded_is_degraded_with_the_pod_reason(model_body) -> None:
    m = parse_model(model_body(replicas=2))
    pods = [pod("p", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                  "message": "Insufficient nvidia.com/gpu"}])]
    deployment = live(model_body, ready=1, updated=1, replicas=2, progressing="False", reason="ProgressDeadlineExceeded")
    status = derive_status(m, 3, deployment, pods, {}, None, NOW)
    assert status["phase"] == "Degraded"
    assert conditions(status)["Degraded"] == ("True", "Unschedulable")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert "960s" in degraded["message"] and "Insufficient nvidia.com/gpu" in degraded["message"]


def test_steady_deployment_losing_pods_is_degraded(model_body) -> None:
    m = parse_model(model_body(replicas=2))
    pods = [pod("p", containerStatuses=[{"state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                         "lastState": {"terminated": {"reason": "OOMKilled"}}}])]
    status = derive_status(m, 3, live(model_body, ready=1, updated=2, replicas=2), pods, {}, None, NOW)
    assert status["phase"] == "Degraded" and conditions(status)["Degraded"] == ("True", "OOMKilled")


def test_pinned_rollback_is_degraded(model_body) -> None:
    m = parse_model(model_body(replicas=2))
    rollback = {"generation": 3, "message": "rolled back", "toCheckpoint": "log/model_40000.pt"}
    status = derive_status(m, 3, live(model_body, ready=2, updated=2, replicas=2), [], {}, rollback, NOW)
    assert status["phase"] == "Degraded" and conditions(status)["Degraded"] == ("True", "RolledBack")
    assert status["rollback"] == rollback
    assert status["lastGoodCheckpoint"] is None  # a rollback never promotes anything to "good"


def test_scaled_to_zero_is_ready_but_proves_nothing(model_body) -> None:
    m = parse_model(model_body(replicas=0))
    status = derive_status(m, 3, live(model_body, ready=0, updated=0, replicas=0, desired=0), [], {}, None, NOW)
    assert status["phase"] == "Ready" and status["lastGoodCheckpoint"] is None
    assert "scaled to zero" in status["conditions"][0]["message"]


def test_transition_time_only_moves_on_a_flip(model_body) -> None:
    m = parse_model(model_body(replicas=2))
    ready = live(model_body, ready=2, updated=2, replicas=2)
    first = derive_status(m, 3, ready, [], {}, None, "2026-01-01T00:00:00Z")
    again = derive_status(m, 3, ready, [], first, None, "2026-01-01T00:05:00Z")
    assert again["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    down = derive_status(m, 3, live(model_body, ready=0, updated=2, replicas=2), [], again, None, "2026-01-01T00:09:00Z")
    assert down["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:09:00Z"


def test_invalid_spec_status_names_the_field() -> None:
    status = invalid_spec_status("spec.gpus", "must be in [0, 16], got -1", 4, {}, NOW)
    assert status["phase"] == "Failed" and status["observedGeneration"] == 4
    assert all(c["reason"] == "InvalidSpec" and c["message"].startswith("spec.gpus:") for c in status["conditions"])
