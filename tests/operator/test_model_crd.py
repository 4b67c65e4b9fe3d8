"""The CRD: structure, subresources, columns, defaults equal to spec.py's, and samples valid against it."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from operator_helpers import CRD_PATH, K8S_VERSION, REPO

from nanogpt_operator.model.spec import parse_model


def crd() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return data


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def spec_props() -> dict[str, Any]:
    return schema()["properties"]["spec"]["properties"]


def validate(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, schema(), cls=jsonschema.Draft7Validator)


def samples() -> list[dict[str, Any]]:
    docs = yaml.safe_load_all((REPO / "manifests" / "samples" / "nanogptmodel.yaml").read_text())
    return [d for d in docs if d and d["kind"] == "NanoGPTModel"]


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(crd(), K8S_VERSION, strict=True)


def test_names_scope_and_subresources() -> None:
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == "nanogptmodels.nanogpt.dev"
    assert (spec["group"], spec["scope"]) == ("nanogpt.dev", "Namespaced")
    assert spec["names"]["kind"] == "NanoGPTModel" and spec["names"]["plural"] == "nanogptmodels"
    assert spec["names"]["shortNames"] == ["ngm"]
    version = spec["versions"][0]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Source"] == ".status.source" and columns["Replicas"] == ".spec.replicas"
    assert columns["Ready"] == ".status.readyReplicas" and columns["Phase"] == ".status.phase"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert columns["Fetched"] == ".status.fetch.doneBytes"  # -o wide, while a uri is being fetched


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, child in (node.get("properties") or {}).items():
            found.extend(_walk(child, f"{path}.{key}"))
        if isinstance(node.get("items"), dict):
            found.extend(_walk(node["items"], f"{path}[]"))
        if isinstance(node.get("additionalProperties"), dict):
            found.extend(_walk(node["additionalProperties"], f"{path}{{}}"))
    return found


def test_schema_is_structural() -> None:
    """Every node has a type, except int-or-string and preserve-unknown-fields ones (apiextensions rules)."""
    for path, node in _walk(schema()):
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "type" in node, path
        assert "anyOf" not in node and "oneOf" not in node, path


def test_cross_field_rules_are_cel() -> None:
    rules = [rule["rule"] for _, node in _walk(schema()) for rule in node.get("x-kubernetes-validations", [])]
    joined = " ".join(rules)
    for fragment in ("minReplicas <= self.maxReplicas", "maxSurge", "nvidia.com/gpu", "MODEL_CHECKPOINT",
                     "targetCPUUtilization"):
        assert fragment in joined, fragment


def _defaults(node: dict[str, Any]) -> dict[str, Any]:
    """Apply schema defaults like the API server does (objects first, then their fields)."""
    return {k: v["default"] for k, v in (node.get("properties") or {}).items() if "default" in v}


def test_crd_defaults_equal_spec_defaults(model_body) -> None:
    props = spec_props()
    m = parse_model(model_body())
    top = _defaults(schema()["properties"]["spec"])
    # No image default in the CRD: the operator picks its GPU or CPU image (test_model_images.py).
    assert "image" not in top
    assert (top["imagePullPolicy"], top["replicas"], top["gpus"]) == (m.image_pull_policy, m.replicas, m.gpus)
    server = _defaults(props["server"])
    assert (server["maxLength"], server["drainSeconds"], server["startupTimeoutSeconds"]) == (
        m.server.max_length, m.server.drain_seconds, m.server.startup_timeout_seconds)
    assert props["server"]["properties"]["apiKeySecretRef"]["properties"]["key"]["default"] == "keys"
    service = _defaults(props["service"])
    assert (service["type"], service["port"]) == (m.service.type, m.service.port)
    rollout = _defaults(props["rollout"])
    assert (rollout["maxSurge"], rollout["maxUnavailable"], rollout["autoRollback"]) == (
        m.rollout.max_surge, m.rollout.max_unavailable, m.rollout.auto_rollback)
    # The rollout deadline follows the load budget unless given (the CRD cannot express that default).
    assert "progressDeadlineSeconds" not in rollout and m.rollout.progress_deadline_seconds is None
    assert server["preStopSeconds"] == m.server.pre_stop_seconds
    assert _defaults(props["autoscaling"])["minReplicas"] == 1
    create = props["checkpoint"]["properties"]["create"]["properties"]
    assert "default" not in create["accessModes"]  # chosen by replica count: test_model_storage.py
    assert create["deletePolicy"]["default"] == "Retain"


def test_enums_match_spec() -> None:
    from nanogpt_operator.model import spec
    props = spec_props()
    assert tuple(props["server"]["properties"]["dtype"]["enum"]) == spec.DTYPES
    assert tuple(props["server"]["properties"]["quantize"]["enum"]) == spec.QUANTIZATIONS
    assert tuple(props["service"]["properties"]["type"]["enum"]) == spec.SERVICE_TYPES
    assert tuple(props["imagePullPolicy"]["enum"]) == spec.PULL_POLICIES


def test_samples_are_valid_and_parse() -> None:
    found = samples()
    assert found, "manifests/samples/nanogptmodel.yaml has no NanoGPTModel"
    for sample in found:
        validate(sample)
        body = {**sample, "metadata": {**sample["metadata"], "uid": "u"}}
        m = parse_model(body)
        assert m.checkpoint.claim_name == "model-pvc"


@pytest.mark.parametrize(("patch", "field"), [
    ({"replicas": -1}, "replicas"),
    ({"gpus": 17}, "gpus"),
    ({"checkpoint": {"claimName": "model-pvc", "path": ""}}, "path"),  # claimName without path: a CEL rule
    ({"server": {"dtype": "int8"}}, "dtype"),
    ({"server": {"quantize": "int4"}}, "quantize"),
    ({"server": {"rateLimit": "lots"}}, "rateLimit"),
    ({"service": {"type": "ExternalName"}}, "type"),
    ({"rollout": {"maxSurge": "x"}}, "maxSurge"),
    ({"resources": {"limits": {"memory": "lots"}}}, "memory"),
])
def test_schema_rejects_what_cannot_work(patch, field) -> None:
    sample = samples()[0]
    bad = {**sample, "spec": {**sample["spec"], **patch}}
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate(bad)
    assert field in "/".join(str(p) for p in caught.value.absolute_path) + caught.value.message
