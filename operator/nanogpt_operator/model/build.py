"""Pure builders of the desired children of a NanoGPTModel: plain dicts, no I/O.

Every builder is a function of the typed ModelSpec (and the owner's identity), so the same spec always
yields the same objects; that is what makes applying them idempotent and drift measurable.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nanogpt_operator.api import API_VERSION, GROUP, MANAGER, MODEL_KIND
from nanogpt_operator.model.fetch_build import CHECKPOINT_VOLUME, fetch_volumes, fetched_path, init_container
from nanogpt_operator.model.spec import GPU_RESOURCE, ModelSpec

# The server's contract (server/): it listens on 5000 and serves these probe paths.
SERVER_PORT = 5000
READY_PATH, LIVE_PATH = "/readyz", "/healthz"
MODEL_MOUNT = "/models"
API_KEYS_MOUNT = "/etc/nanogpt/api-keys"
CHAT_TEMPLATE_MOUNT = "/etc/nanogpt/chat-template"
# Dockerfile.server creates this user; runAsNonRoot needs a numeric id to verify.
SERVER_UID = 10001
# The pod template records which checkpoint it serves; status and rollback read it back.
CHECKPOINT_ANNOTATION = f"{GROUP}/checkpoint"
# Kubelet's SIGKILL must come after the server's own drain, with room for in-flight generations.
GRACE_MARGIN_S = 15
STARTUP_PERIOD_S = 10


@dataclass(frozen=True)
class Owner:
    """Identity of the NanoGPTModel, for owner references (garbage collection of children)."""

    name: str
    uid: str
    api_version: str = API_VERSION
    kind: str = MODEL_KIND


def owner_of(body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], uid=meta["uid"])


def pod_labels(name: str) -> dict[str, str]:
    """The selector: small and stable, since a Deployment's selector is immutable."""
    return {"app.kubernetes.io/name": "nanogpt", "app.kubernetes.io/instance": name}


def child_labels(name: str) -> dict[str, str]:
    return {**pod_labels(name), "app.kubernetes.io/component": "server",
            "app.kubernetes.io/part-of": "nanogpt", "app.kubernetes.io/managed-by": MANAGER}


# The Gateway API Inference Extension's endpoint picker reads each pod's metrics by the engine this label
# names (gateway-api-inference-extension pkg/epp/.../metrics DefaultEngineTypeLabelKey; the value picks the
# metric names, and the server exports vLLM's). llm-d's picker reads LLMD_ENGINE_LABEL first and this one
# as a deprecated fallback, so the pods carry both (model/gateway.py builds the InferencePool).
ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
LLMD_ENGINE_LABEL = "llm-d.ai/engine-type"
ENGINE_TYPE = "vllm"


def template_labels(m: ModelSpec) -> dict[str, str]:
    labels = child_labels(m.name)
    if m.gateway is not None:
        labels[ENGINE_LABEL] = labels[LLMD_ENGINE_LABEL] = ENGINE_TYPE
    return labels


def child_meta(m: ModelSpec, owner: Owner | None, name: str | None = None) -> dict[str, Any]:
    """Metadata of a child; with an owner the garbage collector deletes it with the model, without it stays."""
    # No blockOwnerDeletion: it needs update on nanogptmodels/finalizers, which the operator never uses.
    meta: dict[str, Any] = {"name": name or m.name, "namespace": m.namespace, "labels": child_labels(m.name)}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": owner.api_version, "kind": owner.kind, "name": owner.name,
                                    "uid": owner.uid, "controller": True}]
    return meta


def endpoint(m: ModelSpec) -> str:
    return f"http://{m.name}.{m.namespace}.svc.{m.cluster_domain}:{m.service.port}"


def stored_form(value: Any) -> Any:
    """`value` as the API server stores it: optional string fields of the core types are `omitempty`
    (k8s.io/api/core/v1 types.go: EnvVar.value, Toleration.key/operator/value/effect), so an empty
    string is dropped on write. Sending one anyway would read back as a difference on every resync."""
    if isinstance(value, Mapping):
        return {k: stored_form(v) for k, v in value.items() if v != ""}
    if isinstance(value, list):
        return [stored_form(v) for v in value]
    return copy.deepcopy(value)


def checkpoint_file(m: ModelSpec) -> str:
    """The server's MODEL_CHECKPOINT: always a local path, so the server never fetches by itself."""
    if m.checkpoint.uri:
        return fetched_path(m.checkpoint, MODEL_MOUNT)
    return f"{MODEL_MOUNT}/{m.checkpoint.path}"


def _model_volume(m: ModelSpec) -> str:
    return CHECKPOINT_VOLUME if m.checkpoint.uri else "model"


SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": SERVER_UID, "runAsGroup": SERVER_UID,
                    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]}}


def _server_env(m: ModelSpec) -> list[dict[str, Any]]:
    values: dict[str, str | None] = {
        "MODEL_CHECKPOINT": checkpoint_file(m),
        "TOKENIZER_PATH": f"{MODEL_MOUNT}/{m.tokenizer_path}" if m.tokenizer_path else None,
        "HOST": "0.0.0.0",
        "PORT": str(SERVER_PORT),
        "DEVICE": "cuda" if m.gpus > 0 else "cpu",
        "DTYPE": m.dtype,
        "QUANTIZE": m.server.quantize,
        "MAX_LENGTH_LIMIT": str(m.server.max_length),
        "RATE_LIMIT": m.server.rate_limit,
        "REDIS_URL": m.server.redis_url,
        "DRAIN_SECONDS": str(m.server.drain_seconds),
        "API_KEYS_FILE": f"{API_KEYS_MOUNT}/{m.server.api_key_secret.key}" if m.server.api_key_secret else None,
        "CHAT_TEMPLATE": f"{CHAT_TEMPLATE_MOUNT}/{m.server.chat_template.key}" if m.server.chat_template else None,
        "SERVED_MODEL_NAME": ",".join(m.server.served_model_names) or None,
        # Behind the gateway every request comes from its address: count each tenant by the fairness id
        # the gateway's flow control assigns (server/caller.py); an env entry of the user's wins.
        "RATE_LIMIT_KEY": "fairness" if m.gateway is not None else None,
        # The root filesystem is read-only; libraries that cache under $HOME (triton, torch) need /tmp.
        "HOME": "/tmp",
    }
    user = {var["name"] for var in m.env}
    own = [{"name": k, "value": v} for k, v in values.items() if v is not None and k not in user]
    # An env var's valueFrom is the user's own object, passed as is; only `value: ""` is dropped.
    return own + [{k: v for k, v in copy.deepcopy(dict(var)).items() if v != ""} for var in m.env]


def _resources(m: ModelSpec) -> dict[str, Any]:
    resources = copy.deepcopy(dict(m.resources))
    if m.gpus > 0:
        resources.setdefault("limits", {})[GPU_RESOURCE] = m.gpus
    return resources


def _probe(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def _container(m: ModelSpec) -> dict[str, Any]:
    mounts = [{"name": _model_volume(m), "mountPath": MODEL_MOUNT, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"}]
    if m.server.api_key_secret:
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    if m.server.chat_template:
        mounts.append({"name": "chat-template", "mountPath": CHAT_TEMPLATE_MOUNT, "readOnly": True})
    startup_failures = math.ceil(m.server.startup_timeout_seconds / STARTUP_PERIOD_S)
    return {
        "name": "server",
        "image": m.image,
        "imagePullPolicy": m.image_pull_policy,
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "env": _server_env(m),
        "resources": _resources(m),
        "volumeMounts": mounts,
        # The startup probe measures loading: /readyz turns 200 once the model is loaded and warmed, so a
        # load slower than startupTimeoutSeconds (or hung) restarts the container. Liveness (/healthz, a
        # wedged process) only starts after it; /healthz is 200 while loading, so it cannot measure that.
        "startupProbe": _probe(READY_PATH, STARTUP_PERIOD_S, startup_failures, 5),
        "readinessProbe": _probe(READY_PATH, 5, 3, 3),
        "livenessProbe": _probe(LIVE_PATH, 10, 3, 5),
        "securityContext": copy.deepcopy(SECURITY_CONTEXT),
        **_lifecycle(m),
    }


def _lifecycle(m: ModelSpec) -> dict[str, Any]:
    # A terminating pod leaves the Service's endpoints only after the endpoint controller and every
    # kube-proxy/gateway have seen it; until then it still gets new requests. The preStop delay keeps it
    # serving meanwhile, and SIGTERM (the server's drain) comes after. The `sleep` handler needs neither a
    # shell nor python in the image: beta and on by default since Kubernetes 1.30 (PodLifecycleSleepAction),
    # GA in 1.34. Seconds must be >= 1 before 1.32 (PodLifecycleSleepActionAllowZero), so 0 means none.
    if m.server.pre_stop_seconds <= 0:
        return {}
    return {"lifecycle": {"preStop": {"sleep": {"seconds": m.server.pre_stop_seconds}}}}


def termination_grace_seconds(m: ModelSpec) -> int:
    """Kubelet's SIGKILL comes after the preStop delay, the server's drain, and a margin: it counts both."""
    return m.server.pre_stop_seconds + m.server.drain_seconds + GRACE_MARGIN_S


def _volumes(m: ModelSpec) -> list[dict[str, Any]]:
    if m.checkpoint.uri:
        volumes = fetch_volumes(m.checkpoint)
    else:
        volumes = [{"name": "model", "persistentVolumeClaim": {"claimName": m.checkpoint.claim_name,
                                                                "readOnly": True}}]
    volumes.append({"name": "tmp", "emptyDir": {}})
    ref = m.server.api_key_secret
    if ref:
        volumes.append({"name": "api-keys", "secret": {"secretName": ref.name,
                                                       "items": [{"key": ref.key, "path": ref.key}]}})
    template = m.server.chat_template
    if template:
        volumes.append({"name": "chat-template", "configMap": {
            "name": template.config_map, "items": [{"key": template.key, "path": template.key}]}})
    return volumes


def _tolerations(m: ModelSpec) -> list[dict[str, Any]]:
    tolerations = [stored_form(dict(t)) for t in m.tolerations]
    # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule so that CPU pods stay off them.
    if m.gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _pod_spec(m: ModelSpec) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [_container(m)],
        "volumes": _volumes(m),
        # The server never calls the Kubernetes API, so it gets no token.
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": termination_grace_seconds(m),
    }
    optional = {
        "nodeSelector": dict(m.node_selector) or None,
        "tolerations": _tolerations(m) or None,
        "affinity": copy.deepcopy(dict(m.affinity)) if m.affinity else None,
        "priorityClassName": m.priority_class_name or None,
        "imagePullSecrets": [{"name": n} for n in m.image_pull_secrets] or None,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    if m.checkpoint.uri:
        spec["initContainers"] = [init_container(m.checkpoint, m.image, m.image_pull_policy,
                                                 copy.deepcopy(SECURITY_CONTEXT), MODEL_MOUNT)]
    return spec


def deployment_replicas(m: ModelSpec) -> int:
    """Replicas to create with; with an HPA this is only the starting point, the HPA owns it after."""
    if m.autoscaling is None:
        return m.replicas
    return min(max(m.replicas, m.autoscaling.min_replicas), m.autoscaling.max_replicas)


def desired_deployment(m: ModelSpec, owner: Owner) -> dict[str, Any]:
    template_meta = {"labels": template_labels(m),
                     "annotations": {**m.pod_annotations, CHECKPOINT_ANNOTATION: m.checkpoint.source}}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": child_meta(m, owner),
        "spec": {
            "replicas": deployment_replicas(m),
            "selector": {"matchLabels": pod_labels(m.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                "maxSurge": m.rollout.max_surge, "maxUnavailable": m.rollout.max_unavailable}},
            "progressDeadlineSeconds": m.progress_deadline_seconds,
            "revisionHistoryLimit": 5,
            "template": {"metadata": template_meta, "spec": _pod_spec(m)},
        },
    }


def desired_service(m: ModelSpec, owner: Owner) -> dict[str, Any]:
    meta = child_meta(m, owner)
    if m.service.annotations:
        meta["annotations"] = dict(m.service.annotations)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"type": m.service.type, "selector": pod_labels(m.name),
                     "ports": [{"name": "http", "port": m.service.port, "targetPort": "http",
                                "protocol": "TCP"}]}}


def desired_pvc(m: ModelSpec, owner: Owner) -> dict[str, Any] | None:
    create = m.checkpoint.create
    if create is None:
        return None
    spec: dict[str, Any] = {"accessModes": list(m.pvc_access_modes),
                            "resources": {"requests": {"storage": create.size}}}
    if create.storage_class_name is not None:
        spec["storageClassName"] = create.storage_class_name
    # Retain (the default): no owner reference, so deleting the model leaves the checkpoints a person
    # copied into the claim; Delete: owned, so the garbage collector removes it with the model.
    claim_owner = owner if create.delete_policy == "Delete" else None
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": child_meta(m, claim_owner, m.checkpoint.claim_name), "spec": spec}


def _hpa_metrics(m: ModelSpec) -> list[dict[str, Any]]:
    assert m.autoscaling is not None
    metrics: list[dict[str, Any]] = []
    if m.autoscaling.target_cpu_utilization is not None:
        metrics.append({"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": m.autoscaling.target_cpu_utilization}}})
    if m.autoscaling.custom_metric is not None:
        metric = m.autoscaling.custom_metric
        metrics.append({"type": "Pods", "pods": {"metric": {"name": metric.name}, "target": {
            "type": "AverageValue", "averageValue": metric.target_average_value}}})
    return metrics


def wants_hpa(m: ModelSpec) -> bool:
    return m.autoscaling is not None and m.autoscaling.keda is None  # KEDA makes and owns its own HPA


def desired_hpa(m: ModelSpec, owner: Owner) -> dict[str, Any] | None:
    if m.autoscaling is None or not wants_hpa(m):
        return None
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": child_meta(m, owner),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": m.name},
                     "minReplicas": m.autoscaling.min_replicas, "maxReplicas": m.autoscaling.max_replicas,
                     "metrics": _hpa_metrics(m)}}


def wants_pdb(m: ModelSpec) -> bool:
    return m.max_replicas > 1


def desired_pdb(m: ModelSpec, owner: Owner) -> dict[str, Any] | None:
    if not wants_pdb(m):
        return None
    # maxUnavailable 1 (not minAvailable) still lets a node drain finish when replicas shrink to one.
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": child_meta(m, owner),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": pod_labels(m.name)}}}


def desired_children(m: ModelSpec, owner: Owner) -> list[dict[str, Any]]:
    """Children in creation order: the claim before the pods that mount it."""
    built = [desired_pvc(m, owner), desired_deployment(m, owner), desired_service(m, owner),
             desired_hpa(m, owner), desired_pdb(m, owner)]
    return [obj for obj in built if obj is not None]


def unwanted_children(m: ModelSpec) -> list[tuple[str, str]]:
    """(kind, name) of optional children the spec no longer asks for, to delete if present."""
    unwanted = []
    if not wants_hpa(m):
        unwanted.append(("HorizontalPodAutoscaler", m.name))
    if not wants_pdb(m):
        unwanted.append(("PodDisruptionBudget", m.name))
    return unwanted
