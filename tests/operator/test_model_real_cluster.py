"""The NanoGPTModel controller against what a real API server, garbage collector and kubelet do
(issue 17), with that behaviour stated as fixtures in k8s_rules.py. Plain function tests."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import kubernetes_validate
import pytest
from k8s_rules import garbage_collect, stored
from operator_helpers import K8S_VERSION

from nanogpt_operator.config import OperatorConfig, config_from_env
from nanogpt_operator.errors import ApiError
from nanogpt_operator.model import reconcile
from nanogpt_operator.model.apply import last_applied_of, with_last_applied
from nanogpt_operator.model.build import Owner, desired_children, desired_deployment, desired_pvc, endpoint
from nanogpt_operator.model.drift import merge_patch
from nanogpt_operator.model.spec import parse_model

LOG = logging.getLogger(__name__)
OWNER = Owner(name="llm", uid="0b5e2c1a-0000-4000-8000-000000000001")


class RecordingClient:
    """A stand-in for KubeClient that stores objects, records every write, and can refuse one kind (422)."""

    def __init__(self, refuse: str | None = None) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []
        self.refuse = refuse

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get((kind, name)))

    async def list(self, kind: str, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        return []

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self.writes.append(("create", obj["kind"]))
        if obj["kind"] == self.refuse:
            raise ApiError(422, "Invalid", f"{obj['kind']} is invalid: metadata.name: Invalid value")
        self.objects[(obj["kind"], obj["metadata"]["name"])] = stored(obj)
        return dict(obj)

    async def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        self.writes.append(("patch", kind))
        return {}

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.writes.append(("delete", kind))
        return False


# ---------------------------------------------------------------- 1. names: nothing half-built

async def test_a_bad_name_writes_no_child(model_body) -> None:
    client = RecordingClient()
    body = model_body()
    body["metadata"]["name"] = "gpt2.small"
    patch, warned = kopf.Patch(), []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kopf, "warn", lambda *a, **k: warned.append(k["reason"]))
        with pytest.raises(kopf.PermanentError):
            await reconcile.run(client, kopf.Body(body), patch, LOG, resync=False)
    assert client.writes == [] and warned == ["InvalidSpec"]
    assert patch["status"]["conditions"][0]["message"].startswith("metadata.name: must be a DNS-1035 label")


# ---------------------------------------------------------------- 2. a 422 is reported once per generation

async def test_a_rejected_child_warns_once_per_generation(model_body) -> None:
    client = RecordingClient(refuse="Service")
    body = model_body()
    warned: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kopf, "warn", lambda *a, **k: warned.append(k["reason"]))
        first = kopf.Patch()
        with pytest.raises(kopf.PermanentError):
            await reconcile.run(client, kopf.Body(body), first, LOG, resync=False)
        assert warned == ["Rejected"] and first["status"]["phase"] == "Failed"
        body["status"] = dict(first["status"])  # kopf wrote it
        for _ in range(3):  # resyncs of the same generation
            again = kopf.Patch()
            await reconcile.run(client, kopf.Body(body), again, LOG, resync=True)
            assert not again
        assert warned == ["Rejected"]
        body["metadata"]["generation"] = 2  # an edit of the spec is judged again
        with pytest.raises(kopf.PermanentError):
            await reconcile.run(client, kopf.Body(body), kopf.Patch(), LOG, resync=True)
    assert warned == ["Rejected", "Rejected"]


# ---------------------------------------------------------------- 3. children as the API server stores them

EMPTY_STRINGS = dict(env=[{"name": "EMPTY", "value": ""}, {"name": "SET", "value": "x"}],
                     tolerations=[{"key": "", "operator": "Exists", "value": "", "effect": "NoSchedule"}],
                     priorityClassName="")


def test_children_match_their_stored_form_so_resync_sees_no_drift(model_body) -> None:
    m = parse_model(model_body(**EMPTY_STRINGS))
    for desired in desired_children(m, OWNER):
        body = with_last_applied(desired)
        live = stored(body)  # what a GET returns after the create
        assert merge_patch(body, live, last_applied_of(live)) == {}, desired["kind"]
    pod = desired_deployment(m, OWNER)["spec"]["template"]["spec"]
    assert {"name": "EMPTY"} in pod["containers"][0]["env"] and "priorityClassName" not in pod
    assert {"operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


async def test_a_resync_after_create_patches_nothing(model_body) -> None:
    client = RecordingClient()
    body = model_body(**EMPTY_STRINGS)
    outcome = await reconcile.reconcile_model(client, body, resync=False, now="t")
    assert {kind for _, kind in client.writes} == {"Deployment", "Service"}
    client.writes.clear()
    outcome = await reconcile.reconcile_model(client, body, resync=True, now="t")
    assert [w for w in client.writes if w[0] == "patch"] == [] and outcome.events == ()


# ---------------------------------------------------------------- 4. the startup probe measures loading

def test_startup_probe_waits_for_the_model_and_the_deadline_covers_it(model_body) -> None:
    m = parse_model(model_body(server={"startupTimeoutSeconds": 1800}))
    d = desired_deployment(m, OWNER)
    c = d["spec"]["template"]["spec"]["containers"][0]
    startup = c["startupProbe"]
    # /readyz: 200 once the model is loaded and warmed; /healthz is 200 while it loads.
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert d["spec"]["progressDeadlineSeconds"] >= startup["periodSeconds"] * startup["failureThreshold"]


# ---------------------------------------------------------------- 7. a checkpoint store outlives its model

def test_a_created_claim_survives_the_model_by_default(model_body) -> None:
    m = parse_model(model_body(checkpoint={"claimName": "ckpts", "path": "a.pt", "create": {"size": "10Gi"}}))
    children = desired_children(m, OWNER)
    left = {o["kind"] for o in garbage_collect(children, {OWNER.uid})}
    assert left == {"PersistentVolumeClaim"}


def test_delete_policy_delete_lets_the_claim_go_with_the_model(model_body) -> None:
    create = {"size": "10Gi", "deletePolicy": "Delete"}
    m = parse_model(model_body(checkpoint={"claimName": "ckpts", "path": "a.pt", "create": create}))
    assert garbage_collect(desired_children(m, OWNER), {OWNER.uid}) == []


# ---------------------------------------------------------------- 8. access modes that can be provisioned

@pytest.mark.parametrize(("spec", "modes"), [
    ({"replicas": 1}, ["ReadWriteOnce"]),
    ({"replicas": 0}, ["ReadWriteOnce"]),
    ({"replicas": 3}, ["ReadWriteMany"]),
    ({"replicas": 1, "autoscaling": {"maxReplicas": 4, "customMetric": {"name": "q", "targetAverageValue": 2}}},
     ["ReadWriteMany"]),
    ({"replicas": 3, "accessModes": ["ReadOnlyMany"]}, ["ReadOnlyMany"]),
])
def test_created_claim_modes_follow_the_replica_count(model_body, spec: dict[str, Any], modes: list[str]) -> None:
    spec = dict(spec)
    create = {"size": "10Gi", **({"accessModes": spec.pop("accessModes")} if "accessModes" in spec else {})}
    m = parse_model(model_body(checkpoint={"claimName": "ckpts", "path": "a.pt", "create": create}, **spec))
    pvc = desired_pvc(m, OWNER)
    assert pvc is not None and pvc["spec"]["accessModes"] == modes
    kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- 9. endpoints go before the server drains

@pytest.mark.parametrize("version", ["1.30", "1.31", "1.32", "1.33"])
def test_prestop_delay_comes_before_the_drain_within_the_grace_period(model_body, version: str) -> None:
    m = parse_model(model_body(server={"preStopSeconds": 10, "drainSeconds": 40}))
    d = desired_deployment(m, OWNER)
    pod = d["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": 10}}}
    assert pod["terminationGracePeriodSeconds"] > 10 + 40
    kubernetes_validate.validate(d, version, strict=True)  # the sleep handler is in every supported version


def test_prestop_zero_means_no_hook(model_body) -> None:
    d = desired_deployment(parse_model(model_body(server={"preStopSeconds": 0})), OWNER)
    assert "lifecycle" not in d["spec"]["template"]["spec"]["containers"][0]
    assert parse_model(model_body()).server.pre_stop_seconds == 5


# ---------------------------------------------------------------- 11. the cluster domain is a setting

def test_endpoint_uses_the_configured_cluster_domain(model_body) -> None:
    config = config_from_env({"NANOGPT_OPERATOR_CLUSTER_DOMAIN": "corp.internal"})
    assert endpoint(parse_model(model_body(), config)) == "http://llm.ml.svc.corp.internal:80"
    assert endpoint(parse_model(model_body())) == "http://llm.ml.svc.cluster.local:80"
    assert OperatorConfig().cluster_domain == "cluster.local"
