"""Wiring tests: the real operator under kopf's KopfRunner against kmock's Kubernetes emulator.

The emulator stores objects and streams watch events but runs no controllers, so the tests play the
controllers' part: they bump metadata.generation on spec edits (the API server), write Deployment status
(the Deployment controller) and create failing pods (the kubelet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import kopf
from kopf.testing import KopfRunner

from nanogpt_operator.model.handlers import register
import kmock
from k8s_rules import deletion_completes, garbage_collect
from operator_helpers import Api, eventually, kopf_running, model_path

RESYNC_S = 0.3
DEPLOY = "/apis/apps/v1/namespaces/ml/deployments/llm"
SERVICE = "/api/v1/namespaces/ml/services/llm"
PDB = "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/llm"
HPA = "/apis/autoscaling/v2/namespaces/ml/horizontalpodautoscalers/llm"


@contextlib.asynccontextmanager
async def operator(api: Api) -> AsyncIterator[KopfRunner]:
    """Run the operator with a short resync period; stop it off the event loop the emulator runs on."""
    registry = kopf.OperatorRegistry()
    register(registry, resync_seconds=RESYNC_S)
    async with kopf_running(registry, api.base, verbose=True) as runner:
        yield runner
    assert "Traceback" not in runner.output, runner.output[-5000:]


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {var["name"]: var.get("value") for var in container["env"]}


async def model_status(api: Api) -> dict[str, Any]:
    return (await api.get(model_path(name="llm")) or {}).get("status") or {}


async def events(api: Api) -> list[dict[str, Any]]:
    data = await api.get("/api/v1/namespaces/ml/events") or {}
    return data.get("items") or []


async def event_with(api: Api, reason: str) -> dict[str, Any]:
    """The first Event with `reason`, waited for: kopf.event() queues it for a background poster, so it
    may reach the API server after the status patch of the same reconcile."""
    async def posted() -> dict[str, Any] | None:
        return next((e for e in await events(api) if e.get("reason") == reason), None)

    return await eventually(posted, what=f"a {reason} event")


async def edit_spec(api: Api, spec: dict[str, Any]) -> None:
    """`kubectl apply` of a changed spec (the emulator bumps metadata.generation, as the API server does)."""
    await api.must("PATCH", model_path(name="llm"), {"spec": spec})


async def deployment_ready(api: Api, replicas: int) -> None:
    """Play the Deployment controller: it has seen the current template, and every replica is ready."""
    generation = (await api.must("GET", DEPLOY))["metadata"]["generation"]
    await api.must("PATCH", DEPLOY + "/status", {"status": {
        "observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}})


async def test_create_makes_children_then_ready(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body(replicas=2))
        deployment = await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        assert await eventually(lambda: api.get(SERVICE), what="the Service")
        assert await eventually(lambda: api.get(PDB), what="the PodDisruptionBudget")
        assert deployment["metadata"]["ownerReferences"][0]["uid"] == model_body()["metadata"]["uid"]
        assert env_of(deployment)["MODEL_CHECKPOINT"] == "/models/log/model_40000.pt"
        assert deployment["spec"]["replicas"] == 2
        status = await eventually(lambda: model_status(api), what="a status")
        assert status["phase"] == "Pending"
        assert status["endpoint"] == "http://llm.ml.svc.cluster.local:80"

        await deployment_ready(api, 2)

        async def ready() -> bool:
            return (await model_status(api)).get("phase") == "Ready"

        await eventually(ready, what="phase Ready")
        status = await model_status(api)
        assert status["lastGoodCheckpoint"] == "log/model_40000.pt"
        assert status["readyReplicas"] == 2
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "Ready": "True", "Progressing": "False", "Degraded": "False"}


async def test_checkpoint_change_rolls_the_template(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body())
        await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        await edit_spec(api, {"checkpoint": {"claimName": "model-pvc", "path": "log/model_50000.pt"}})

        async def rolled() -> bool:
            deployment = await api.get(DEPLOY)
            return env_of(deployment)["MODEL_CHECKPOINT"] == "/models/log/model_50000.pt"

        await eventually(rolled, what="the new checkpoint in the pod template")
        deployment = await api.get(DEPLOY)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["nanogpt.dev/checkpoint"] == "log/model_50000.pt"
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


async def test_scale_subresource_scales_the_deployment(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body(replicas=1))
        await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        assert await api.get(PDB) is None  # one replica: nothing to budget
        await edit_spec(api, {"replicas": 3})  # what `kubectl scale ngm/llm --replicas=3` writes

        async def scaled() -> bool:
            return (await api.get(DEPLOY))["spec"]["replicas"] == 3

        await eventually(scaled, what="3 replicas")
        assert await eventually(lambda: api.get(PDB), what="a PodDisruptionBudget once replicas > 1")


async def test_hand_edits_and_deletions_are_repaired(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body())
        await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        await eventually(lambda: model_status(api), what="a first status")

        await api.must("DELETE", SERVICE)
        assert await eventually(lambda: api.get(SERVICE), what="the Service recreated")

        await api.must("PATCH", DEPLOY, {"spec": {"replicas": 7}})

        async def restored() -> bool:
            return (await api.get(DEPLOY))["spec"]["replicas"] == 1

        await eventually(restored, what="replicas restored to 1")

        async def drift_events() -> list[str]:
            return [e["message"] for e in await events(api) if e.get("reason") == "DriftCorrected"]

        messages = await eventually(drift_events, what="DriftCorrected events")
        await eventually(lambda: _both(drift_events), what="both corrections reported")
        messages = await drift_events()
        assert any("Service llm was deleted" in m for m in messages), messages
        assert any("Deployment llm" in m and "spec.replicas" in m for m in messages), messages


async def _both(drift_events: Any) -> bool:
    messages = await drift_events()
    return any("Service" in m for m in messages) and any("spec.replicas" in m for m in messages)


async def test_invalid_spec_fails_and_leaves_children_untouched(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body())
        before = await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        await edit_spec(api, {"gpus": -1})

        async def failed() -> dict[str, Any] | None:
            status = await model_status(api)
            return status if status.get("phase") == "Failed" else None

        status = await eventually(failed, what="phase Failed")
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "InvalidSpec"
        assert ready["message"].startswith("spec.gpus:")
        assert "spec.gpus" in (await event_with(api, "InvalidSpec"))["message"]
        after = await api.get(DEPLOY)
        assert after["spec"] == before["spec"]


async def test_invalid_spec_on_create_creates_nothing(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body(rollout={"maxSurge": 0, "maxUnavailable": 0}))

        async def failed() -> bool:
            return (await model_status(api)).get("phase") == "Failed"

        await eventually(failed, what="phase Failed")
        assert "spec.rollout.maxUnavailable" in json.dumps(await model_status(api))
        assert await api.get(DEPLOY) is None
        assert await api.get(SERVICE) is None


async def test_deleting_the_model_stops_reconciling(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body())
        deployment = await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        await api.must("DELETE", model_path(name="llm"))
        await eventually(lambda: _gone(api, model_path(name="llm")), what="the model deleted")
        # The cluster's garbage collector deletes children through their owner reference.
        assert deployment["metadata"]["ownerReferences"][0]["kind"] == "NanoGPTModel"
        await api.must("DELETE", DEPLOY)  # play the garbage collector
        # Several resync periods pass on the operator's side without the child coming back.
        await eventually(lambda: _timer_stopped(emu), what="no more reconciles")
        # A resync round that raced the deletion may have recreated it; owned by the deleted model, the
        # garbage collector removes it (k8s_rules.garbage_collect states the rule).
        left = await api.get(DEPLOY)
        assert left is None or garbage_collect([left], {model_body()["metadata"]["uid"]}) == []


async def _gone(api: Api, path: str) -> bool:
    return await api.get(path) is None


async def _timer_stopped(emu: Any) -> bool:
    # Wait for 2 resync periods' worth of emulator traffic to settle without a Deployment GET... the
    # operator has no object left to time, so requests to the Deployment stop.
    count = len([r for r in emu if "/deployments/llm" in str(r.url)])
    await asyncio.sleep(RESYNC_S * 3)  # an observation window, asserted on below
    return len([r for r in emu if "/deployments/llm" in str(r.url)]) == count


async def test_failed_rollout_rolls_back_to_last_good_checkpoint(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body(replicas=2))
        await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        await deployment_ready(api, 2)

        async def good() -> bool:
            return (await model_status(api)).get("lastGoodCheckpoint") == "log/model_40000.pt"

        await eventually(good, what="lastGoodCheckpoint recorded")
        await edit_spec(api, {"checkpoint": {"claimName": "model-pvc", "path": "log/broken.pt"}})

        async def on_broken() -> bool:
            return env_of(await api.get(DEPLOY))["MODEL_CHECKPOINT"] == "/models/log/broken.pt"

        await eventually(on_broken, what="the broken checkpoint rolled out")
        # Kubelet: the new pod crashes. Deployment controller: the deadline passes.
        await api.must("POST", "/api/v1/namespaces/ml/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "llm-new-1", "namespace": "ml",
                         "labels": {"app.kubernetes.io/name": "nanogpt", "app.kubernetes.io/instance": "llm"}},
            "status": {"containerStatuses": [{"name": "server", "state": {"waiting": {
                "reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}}]}})
        await api.must("PATCH", DEPLOY + "/status", {"status": {"readyReplicas": 1, "updatedReplicas": 1,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}})

        async def rolled_back() -> bool:
            return env_of(await api.get(DEPLOY))["MODEL_CHECKPOINT"] == "/models/log/model_40000.pt"

        await eventually(rolled_back, what="the Deployment back on the last good checkpoint")

        async def degraded() -> dict[str, Any] | None:
            status = await model_status(api)
            return status if status.get("rollback") and status.get("phase") == "Degraded" else None

        status = await eventually(degraded, what="phase Degraded with a rollback")
        assert status["rollback"]["fromCheckpoint"] == "log/broken.pt"
        assert status["rollback"]["reason"] == "CrashLoopBackOff"
        degraded_condition = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert degraded_condition["reason"] == "RolledBack"
        assert "log/broken.pt" in (await event_with(api, "RolledBack"))["message"]


# ------------------------------------------------------------------ issue 17: what a real cluster does

@contextlib.asynccontextmanager
async def slow_resync_operator(api: Api) -> AsyncIterator[KopfRunner]:
    """The operator with a resync period far beyond every deadline here: only watch events can act."""
    registry = kopf.OperatorRegistry()
    register(registry, resync_seconds=600)
    async with kopf_running(registry, api.base, verbose=True) as runner:
        yield runner
    assert "Traceback" not in runner.output, runner.output[-5000:]


async def test_models_carry_no_finalizer_so_deletion_needs_no_operator(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api):
        await api.must("POST", model_path(), model_body())
        await eventually(lambda: model_status(api), what="a status")
        await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        # Let a few resync rounds pass: none of them may add a finalizer either.
        await eventually(lambda: _timer_rounds(emu, 3), what="three resync rounds")
    # The operator is down now. An API server removes an object on DELETE only without finalizers.
    live = await api.must("GET", model_path(name="llm"))
    assert deletion_completes(live), live["metadata"].get("finalizers")


async def _timer_rounds(emu: Any, rounds: int) -> bool:
    # Each resync round ends by writing the model's status: one status PATCH by the client.
    writes = [r for r in emu if str(r.url).split("?")[0].endswith("/nanogptmodels/llm/status")]
    return len(writes) >= rounds


async def test_status_follows_the_deployment_without_waiting_for_a_resync(emulator, model_body) -> None:
    emu, api = emulator
    async with slow_resync_operator(api):
        await api.must("POST", model_path(), model_body(replicas=2))
        await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        assert (await eventually(lambda: model_status(api), what="a status"))["phase"] == "Pending"
        await deployment_ready(api, 2)  # the Deployment controller's status write: a watch event

        async def ready() -> dict[str, Any] | None:
            status = await model_status(api)
            return status if status.get("phase") == "Ready" else None

        status = await eventually(ready, timeout=10.0, what="phase Ready from the Deployment's event")
        assert status["readyReplicas"] == 2 and status["lastGoodCheckpoint"] == "log/model_40000.pt"
