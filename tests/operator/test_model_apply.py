"""apply.py and client.py against the emulator: create, no-op, patch only drift, 409, remove, errors."""

from __future__ import annotations

import json
import os

import pytest

from nanogpt_operator.model.apply import LAST_APPLIED, apply, ensure_peering, remove
from nanogpt_operator.model.build import Owner, desired_deployment, desired_pdb
from nanogpt_operator.client import KubeClient, collection_path, error_for
from nanogpt_operator.config import config_from_env
from nanogpt_operator.errors import ApiError, ConflictError, TransientApiError
from nanogpt_operator.model.spec import parse_model

OWNER = Owner(name="llm", uid="u-1")
DEPLOY = "/apis/apps/v1/namespaces/ml/deployments/llm"


@pytest.fixture
async def client(emulator):
    kube = await KubeClient.connect(config_from_env(dict(os.environ)))
    yield kube
    await kube.close()


async def test_create_then_nothing_then_patch_only_drift(emulator, client, model_body) -> None:
    emu, api = emulator
    desired = desired_deployment(parse_model(model_body()), OWNER)
    assert (await apply(client, desired)).action == "created"
    live = await api.get(DEPLOY)
    assert json.loads(live["metadata"]["annotations"][LAST_APPLIED]) == desired
    assert (await apply(client, desired)).action == "unchanged"

    await api.must("PATCH", DEPLOY, {"spec": {"replicas": 5}})
    result = await apply(client, desired)
    assert (result.action, result.paths, result.drift) == ("patched", ("spec.replicas",), True)
    assert (await api.get(DEPLOY))["spec"]["replicas"] == 1

    changed = desired_deployment(parse_model(model_body(image="srv:2")), OWNER)
    result = await apply(client, changed)
    assert result.action == "patched" and not result.drift
    assert result.paths == ("spec.template.spec.containers",)


async def test_hpa_owned_replicas_are_left_alone(emulator, client, model_body) -> None:
    emu, api = emulator
    desired = desired_deployment(parse_model(model_body()), OWNER)
    await apply(client, desired)
    await api.must("PATCH", DEPLOY, {"spec": {"replicas": 6}})  # the HPA scaled it
    result = await apply(client, desired, keep=frozenset({("spec", "replicas")}))
    assert result.action == "unchanged" and (await api.get(DEPLOY))["spec"]["replicas"] == 6


async def test_remove_only_touches_managed_objects(emulator, client, model_body) -> None:
    emu, api = emulator
    pdb = desired_pdb(parse_model(model_body(replicas=2)), OWNER)
    assert pdb is not None
    await apply(client, pdb)
    assert (await remove(client, "PodDisruptionBudget", "ml", "llm")) is not None
    assert await remove(client, "PodDisruptionBudget", "ml", "llm") is None
    foreign = {**pdb, "metadata": {"name": "llm", "namespace": "ml", "labels": {}}}
    await api.must("POST", "/apis/policy/v1/namespaces/ml/poddisruptionbudgets", foreign)
    assert await remove(client, "PodDisruptionBudget", "ml", "llm") is None
    assert await api.get("/apis/policy/v1/namespaces/ml/poddisruptionbudgets/llm") is not None


async def test_conflict_and_lists(emulator, client, model_body) -> None:
    emu, api = emulator
    desired = desired_deployment(parse_model(model_body()), OWNER)
    await client.create(desired)
    with pytest.raises(ConflictError):
        await client.create(desired)
    assert await client.get("Deployment", "ml", "nope") is None
    assert await client.delete("Deployment", "ml", "nope") is False
    pods = await client.list("Pod", "ml", {"app.kubernetes.io/instance": "llm"})
    assert pods == []


async def test_peering_object_is_created_once(emulator, client) -> None:
    assert await ensure_peering(client, "nanogpt-operator") is True
    assert await ensure_peering(client, "nanogpt-operator") is False


async def test_unreachable_api_is_transient(emulator, client) -> None:
    await client.close()
    with pytest.raises(TransientApiError):
        await client.get("Deployment", "ml", "llm")


def test_error_mapping_and_paths() -> None:
    assert isinstance(error_for(409, {}), ConflictError)
    assert isinstance(error_for(503, {}), TransientApiError) and isinstance(error_for(429, {}), TransientApiError)
    forbidden = error_for(403, {"reason": "Forbidden", "message": "no"})
    assert type(forbidden) is ApiError and forbidden.status == 403 and "no" in str(forbidden)
    assert collection_path("Service", "ml") == "/api/v1/namespaces/ml/services"
    assert collection_path("HorizontalPodAutoscaler", "ml") == "/apis/autoscaling/v2/namespaces/ml/horizontalpodautoscalers"
    assert collection_path("ClusterKopfPeering", None) == "/apis/kopf.dev/v1/clusterkopfpeerings"
