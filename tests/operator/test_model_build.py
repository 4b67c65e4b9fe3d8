"""build.py: the desired children, field by field, and each one valid against Kubernetes 1.30 (strict)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from operator_helpers import K8S_VERSION

from nanogpt_operator.model.build import (Owner, desired_children, desired_deployment, desired_hpa, desired_pdb, desired_pvc,
                                    desired_service, endpoint, unwanted_children)
from nanogpt_operator.model.spec import parse_model

OWNER = Owner(name="llm", uid="0b5e2c1a-0000-4000-8000-000000000001")
FULL = dict(
    checkpoint={"claimName": "ckpts", "path": "out/ckpt.pt",
                "create": {"size": "20Gi", "storageClassName": "standard", "accessModes": ["ReadOnlyMany"]}},
    tokenizer={"path": "data/meta.pkl"}, imagePullSecrets=[{"name": "regcred"}], replicas=3, gpus=2,
    resources={"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
    server={"apiKeySecretRef": {"name": "keys"}, "rateLimit": "10/minute", "redisUrl": "redis://r:6379"},
    service={"type": "LoadBalancer", "port": 8080, "annotations": {"lb": "internal"}},
    autoscaling={"minReplicas": 2, "maxReplicas": 8, "targetCPUUtilization": 70,
                 "customMetric": {"name": "nanogpt_requests_in_flight", "targetAverageValue": "4"}},
    rollout={"maxSurge": "25%", "maxUnavailable": 0},
    nodeSelector={"gpu": "a100"}, tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml",
                                                "effect": "NoSchedule"}],
    affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}},
    priorityClassName="high", podAnnotations={"team": "ml"},
    env=[{"name": "LOG_LEVEL", "value": "debug"},
         {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
)


def pod(d: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = d["spec"]["template"]["spec"]
    return spec


def env(d: dict[str, Any]) -> dict[str, Any]:
    return {v["name"]: v.get("value", v.get("valueFrom")) for v in pod(d)["containers"][0]["env"]}


@pytest.mark.parametrize("spec", [{}, FULL, {"gpus": 0, "replicas": 0}], ids=["minimal", "full", "cpu-zero"])
def test_every_child_is_valid_kubernetes(model_body, spec) -> None:
    for obj in desired_children(parse_model(model_body(**spec)), OWNER):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_children_are_owned_and_labelled(model_body) -> None:
    for obj in desired_children(parse_model(model_body(**FULL)), OWNER):
        meta = obj["metadata"]
        assert meta["namespace"] == "ml"
        if obj["kind"] == "PersistentVolumeClaim":  # deletePolicy Retain: see test_model_storage.py
            assert "ownerReferences" not in meta
            continue
        assert meta["ownerReferences"] == [{"apiVersion": "nanogpt.dev/v1alpha1", "kind": "NanoGPTModel",
                                            "name": "llm", "uid": OWNER.uid, "controller": True}]
        assert meta["labels"]["app.kubernetes.io/instance"] == "llm"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "nanogpt-operator"
    kinds = [o["kind"] for o in desired_children(parse_model(model_body(**FULL)), OWNER)]
    assert kinds == ["PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]


def test_deployment_runs_the_server_contract(model_body) -> None:
    d = desired_deployment(parse_model(model_body()), OWNER)
    c = pod(d)["containers"][0]
    assert env(d) == {"MODEL_CHECKPOINT": "/models/log/model_40000.pt", "HOST": "0.0.0.0", "PORT": "5000",
                      "DEVICE": "cuda", "DTYPE": "bfloat16", "MAX_LENGTH_LIMIT": "1000", "DRAIN_SECONDS": "30",
                      "HOME": "/tmp"}
    assert c["ports"] == [{"name": "http", "containerPort": 5000, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 900
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["runAsNonRoot"] is True
    assert pod(d)["terminationGracePeriodSeconds"] > 30
    assert pod(d)["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "model-pvc",
                                                                              "readOnly": True}}
    assert pod(d)["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert d["spec"]["progressDeadlineSeconds"] == 960  # startupTimeoutSeconds 900 + 60
    assert d["spec"]["replicas"] == 1
    assert d["spec"]["template"]["metadata"]["annotations"] == {"nanogpt.dev/checkpoint": "log/model_40000.pt"}


def test_deployment_full_spec(model_body) -> None:
    d = desired_deployment(parse_model(model_body(**FULL)), OWNER)
    c, e = pod(d)["containers"][0], env(d)
    assert e["MODEL_CHECKPOINT"] == "/models/out/ckpt.pt" and e["TOKENIZER_PATH"] == "/models/data/meta.pkl"
    assert e["API_KEYS_FILE"] == "/etc/nanogpt/api-keys/keys"
    assert (e["RATE_LIMIT"], e["REDIS_URL"], e["LOG_LEVEL"]) == ("10/minute", "redis://r:6379", "debug")
    assert e["TOKEN"] == {"secretKeyRef": {"name": "s", "key": "k"}}
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"},
                              "limits": {"memory": "16Gi", "nvidia.com/gpu": 2}}
    assert {"name": "api-keys", "secret": {"secretName": "keys", "items": [{"key": "keys", "path": "keys"}]}} \
        in pod(d)["volumes"]
    assert pod(d)["nodeSelector"] == {"gpu": "a100"} and pod(d)["priorityClassName"] == "high"
    assert pod(d)["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod(d)["affinity"] == FULL["affinity"]
    assert [t["key"] for t in pod(d)["tolerations"]] == ["dedicated", "nvidia.com/gpu"]
    assert d["spec"]["template"]["metadata"]["annotations"]["team"] == "ml"
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": 0}
    assert d["spec"]["replicas"] == 3  # between the HPA's bounds


def test_user_env_overrides_operator_defaults_but_not_reserved(model_body) -> None:
    d = desired_deployment(parse_model(model_body(env=[{"name": "DTYPE", "value": "float32"}])), OWNER)
    names = [v["name"] for v in pod(d)["containers"][0]["env"]]
    assert names.count("DTYPE") == 1 and env(d)["DTYPE"] == "float32"


def test_cpu_only_has_no_gpu_limit_or_toleration(model_body) -> None:
    d = desired_deployment(parse_model(model_body(gpus=0)), OWNER)
    assert pod(d)["containers"][0]["resources"] == {}
    assert "tolerations" not in pod(d)
    assert env(d)["DEVICE"] == "cpu" and env(d)["DTYPE"] == "float32"


def test_user_gpu_toleration_replaces_the_default(model_body) -> None:
    own = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}
    d = desired_deployment(parse_model(model_body(tolerations=[own])), OWNER)
    assert pod(d)["tolerations"] == [own]


def test_replicas_are_clamped_to_the_hpa_bounds(model_body) -> None:
    scaling = {"minReplicas": 2, "maxReplicas": 4, "customMetric": {"name": "m", "targetAverageValue": 1}}
    assert desired_deployment(parse_model(model_body(replicas=1, autoscaling=scaling)), OWNER)["spec"]["replicas"] == 2
    assert desired_deployment(parse_model(model_body(replicas=9, autoscaling=scaling)), OWNER)["spec"]["replicas"] == 4


def test_service_maps_its_port_to_the_server(model_body) -> None:
    s = desired_service(parse_model(model_body()), OWNER)
    assert s["spec"] == {"type": "ClusterIP", "selector": {"app.kubernetes.io/name": "nanogpt",
                                                           "app.kubernetes.io/instance": "llm"},
                         "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}
    assert "annotations" not in s["metadata"]
    full = desired_service(parse_model(model_body(**FULL)), OWNER)
    assert full["spec"]["type"] == "LoadBalancer" and full["metadata"]["annotations"] == {"lb": "internal"}
    assert endpoint(parse_model(model_body(**FULL))) == "http://llm.ml.svc.cluster.local:8080"


def test_pvc_only_when_asked(model_body) -> None:
    assert desired_pvc(parse_model(model_body()), OWNER) is None
    pvc = desired_pvc(parse_model(model_body(**FULL)), OWNER)
    assert pvc is not None and pvc["metadata"]["name"] == "ckpts"
    assert pvc["spec"] == {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "20Gi"}},
                           "storageClassName": "standard"}


def test_hpa_targets_the_deployment(model_body) -> None:
    assert desired_hpa(parse_model(model_body()), OWNER) is None
    hpa = desired_hpa(parse_model(model_body(**FULL)), OWNER)
    assert hpa is not None
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] == "nanogpt_requests_in_flight"


def test_pdb_only_with_more_than_one_replica(model_body) -> None:
    assert desired_pdb(parse_model(model_body(replicas=1)), OWNER) is None
    pdb = desired_pdb(parse_model(model_body(replicas=2)), OWNER)
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1
    assert unwanted_children(parse_model(model_body(replicas=1))) == [
        ("HorizontalPodAutoscaler", "llm"), ("PodDisruptionBudget", "llm")]
    assert unwanted_children(parse_model(model_body(**FULL))) == []


def test_builders_are_pure(model_body) -> None:
    m = parse_model(model_body(**FULL))
    assert desired_children(m, OWNER) == desired_children(m, OWNER)
    first = desired_deployment(m, OWNER)
    first["spec"]["template"]["spec"]["containers"][0]["env"].clear()
    assert env(desired_deployment(m, OWNER))  # no shared mutable state between calls


def test_quantize_int8_sets_the_servers_setting_and_is_absent_by_default(model_body) -> None:
    d = desired_deployment(parse_model(model_body(server={"quantize": "int8"})), OWNER)
    assert env(d)["QUANTIZE"] == "int8"
    assert "QUANTIZE" not in env(desired_deployment(parse_model(model_body()), OWNER))
