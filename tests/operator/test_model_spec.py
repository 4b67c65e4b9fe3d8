"""spec.parse_model: every field's default, value and error path."""

from __future__ import annotations

import pytest

from nanogpt_operator.errors import SpecError
from nanogpt_operator.model.spec import ModelSpec, parse_model


def test_defaults_match_the_crd(model_body) -> None:
    m = parse_model(model_body())
    assert (m.name, m.namespace) == ("llm", "ml")
    assert (m.checkpoint.claim_name, m.checkpoint.path, m.checkpoint.create) == ("model-pvc", "log/model_40000.pt", None)
    assert (m.image, m.image_pull_policy, m.replicas, m.gpus) == ("nanogpt-server:latest", "IfNotPresent", 1, 1)
    assert (m.server.max_length, m.server.drain_seconds, m.server.startup_timeout_seconds) == (1000, 30, 900)
    assert (m.service.type, m.service.port) == ("ClusterIP", 80)
    assert (m.rollout.max_surge, m.rollout.max_unavailable) == (0, 1)
    assert (m.rollout.progress_deadline_seconds, m.rollout.auto_rollback) == (None, True)
    assert m.progress_deadline_seconds == 960 and m.server.pre_stop_seconds == 5
    assert m.autoscaling is None and m.tokenizer_path is None and m.affinity is None
    assert m.dtype == "bfloat16"


def test_every_field_is_read(model_body) -> None:
    m = parse_model(model_body(
        checkpoint={"claimName": "ckpts", "path": "out/", "create": {"size": "20Gi", "storageClassName": "standard",
                                                                      "accessModes": ["ReadOnlyMany"]}},
        tokenizer={"path": "data/meta.pkl"}, image="reg/srv:1", imagePullPolicy="Always",
        imagePullSecrets=[{"name": "regcred"}], replicas=3, gpus=2,
        resources={"requests": {"cpu": "2", "memory": "8Gi"}},
        server={"maxLength": 500, "apiKeySecretRef": {"name": "keys", "key": "list"}, "rateLimit": "10/minute",
                "redisUrl": "redis://redis:6379/0", "dtype": "float16", "quantize": "int8", "drainSeconds": 10,
                "startupTimeoutSeconds": 60},
        service={"type": "LoadBalancer", "port": 8080, "annotations": {"a": "b"}},
        autoscaling={"minReplicas": 2, "maxReplicas": 8, "targetCPUUtilization": 70,
                     "customMetric": {"name": "inflight", "targetAverageValue": 4}},
        rollout={"maxSurge": "25%", "maxUnavailable": 0, "progressDeadlineSeconds": 120, "autoRollback": False},
        nodeSelector={"gpu": "a100"}, tolerations=[{"key": "k", "operator": "Exists"}],
        affinity={"nodeAffinity": {}}, priorityClassName="high", podAnnotations={"p": "q"},
        env=[{"name": "X", "value": "1"}]))
    assert m.checkpoint.create is not None and m.checkpoint.create.access_modes == ("ReadOnlyMany",)
    assert m.tokenizer_path == "data/meta.pkl" and m.image_pull_secrets == ("regcred",)
    assert m.server.api_key_secret is not None and m.server.api_key_secret.key == "list"
    assert (m.server.rate_limit, m.server.redis_url, m.dtype) == ("10/minute", "redis://redis:6379/0", "float16")
    assert m.server.quantize == "int8"
    assert m.autoscaling is not None and m.autoscaling.custom_metric is not None
    assert m.autoscaling.custom_metric.target_average_value == "4"
    assert (m.rollout.max_surge, m.rollout.max_unavailable, m.rollout.auto_rollback) == ("25%", 0, False)
    assert (m.service.type, m.service.port, dict(m.service.annotations)) == ("LoadBalancer", 8080, {"a": "b"})
    assert (dict(m.node_selector), m.priority_class_name, m.env[0]["name"]) == ({"gpu": "a100"}, "high", "X")


def test_cpu_only_defaults_to_float32(model_body) -> None:
    assert parse_model(model_body(gpus=0)).dtype == "float32"


@pytest.mark.parametrize(("spec", "path"), [
    ({"checkpoint": None}, "spec.checkpoint"),
    ({"checkpoint": {"path": "a.pt"}}, "spec.checkpoint.claimName"),
    ({"checkpoint": {"claimName": "Bad_Name", "path": "a.pt"}}, "spec.checkpoint.claimName"),
    ({"checkpoint": {"claimName": "c"}}, "spec.checkpoint.path"),
    ({"checkpoint": {"claimName": "c", "path": "/abs.pt"}}, "spec.checkpoint.path"),
    ({"checkpoint": {"claimName": "c", "path": "../up.pt"}}, "spec.checkpoint.path"),
    ({"checkpoint": {"claimName": "c", "path": "a", "create": {}}}, "spec.checkpoint.create.size"),
    ({"checkpoint": {"claimName": "c", "path": "a", "create": {"size": "lots"}}}, "spec.checkpoint.create.size"),
    ({"checkpoint": {"claimName": "c", "path": "a", "create": {"size": "1Gi", "accessModes": ["Any"]}}},
     "spec.checkpoint.create.accessModes[0]"),
    ({"tokenizer": {"path": "/etc/passwd"}}, "spec.tokenizer.path"),
    ({"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
    ({"replicas": -1}, "spec.replicas"),
    ({"replicas": "2"}, "spec.replicas"),
    ({"gpus": -1}, "spec.gpus"),
    ({"gpus": True}, "spec.gpus"),
    ({"resources": {"limits": {"nvidia.com/gpu": 1}}}, "spec.resources.limits"),
    ({"server": {"maxLength": 0}}, "spec.server.maxLength"),
    ({"server": {"rateLimit": "ten per minute"}}, "spec.server.rateLimit"),
    ({"server": {"redisUrl": "http://redis"}}, "spec.server.redisUrl"),
    ({"server": {"dtype": "int8"}}, "spec.server.dtype"),
    ({"server": {"quantize": "int4"}}, "spec.server.quantize"),
    ({"server": {"apiKeySecretRef": {}}}, "spec.server.apiKeySecretRef.name"),
    ({"service": {"type": "ExternalName"}}, "spec.service.type"),
    ({"service": {"port": 0}}, "spec.service.port"),
    ({"autoscaling": {"minReplicas": 1}}, "spec.autoscaling.maxReplicas"),
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2, "customMetric": {"name": "m", "targetAverageValue": 1}}},
     "spec.autoscaling.minReplicas"),
    ({"autoscaling": {"maxReplicas": 2}}, "spec.autoscaling.targetCPUUtilization"),
    ({"autoscaling": {"maxReplicas": 2, "targetCPUUtilization": 50}}, "spec.autoscaling.targetCPUUtilization"),
    ({"rollout": {"maxSurge": "lots"}}, "spec.rollout.maxSurge"),
    ({"rollout": {"maxSurge": 0, "maxUnavailable": "0%"}}, "spec.rollout.maxUnavailable"),
    ({"rollout": {"progressDeadlineSeconds": 1}}, "spec.rollout.progressDeadlineSeconds"),
    ({"rollout": {"autoRollback": "yes"}}, "spec.rollout.autoRollback"),
    ({"nodeSelector": ["a"]}, "spec.nodeSelector"),
    ({"tolerations": {"key": "a"}}, "spec.tolerations"),
    ({"env": [{"value": "x"}]}, "spec.env[0].name"),
    ({"env": [{"name": "MODEL_CHECKPOINT", "value": "x"}]}, "spec.env[0].name"),
    ({"imagePullSecrets": [{}]}, "spec.imagePullSecrets[0].name"),
])
def test_errors_name_the_field(model_body, spec, path) -> None:
    with pytest.raises(SpecError) as caught:
        parse_model(model_body(**spec))
    assert caught.value.path == path
    assert str(caught.value).startswith(path + ": ")


def test_model_spec_is_frozen(model_body) -> None:
    m = parse_model(model_body())
    with pytest.raises(AttributeError):
        m.replicas = 3  # type: ignore[misc]
    assert isinstance(m, ModelSpec)
