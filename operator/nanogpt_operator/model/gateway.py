"""spec.gateway: the Gateway API Inference Extension objects for one model. Pure builders.

The InferencePool (inference.networking.k8s.io/v1) names the model's pods, the port they serve on and the
endpoint picker (EPP) a gateway consults to pick a pod by queue depth and KV-cache use; the server exports
the series the EPP reads (vllm:num_requests_waiting, vllm:kv_cache_usage_perc, vllm:cache_config_info).
The optional HTTPRoute attaches the pool to a Gateway.
"""

from __future__ import annotations

from typing import Any

from nanogpt_operator.model.build import SERVER_PORT, Owner, child_meta, pod_labels
from nanogpt_operator.model.spec import ModelSpec

INFERENCE_API = "inference.networking.k8s.io/v1"
INFERENCE_GROUP = "inference.networking.k8s.io"
GATEWAY_API = "gateway.networking.k8s.io/v1"
# The pods also carry build.ENGINE_LABEL (engine type vllm) while spec.gateway is set.


def desired_inference_pool(m: ModelSpec, owner: Owner) -> dict[str, Any] | None:
    if m.gateway is None:
        return None
    picker = {"group": "", "kind": "Service", "name": m.gateway.picker_name,
              "port": {"number": m.gateway.picker_port}, "failureMode": m.gateway.failure_mode}
    return {"apiVersion": INFERENCE_API, "kind": "InferencePool", "metadata": child_meta(m, owner),
            "spec": {"selector": {"matchLabels": pod_labels(m.name)},
                     "targetPorts": [{"number": SERVER_PORT}],
                     "endpointPickerRef": picker}}


def _parent(ref: Any) -> dict[str, Any]:
    parent = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": ref.name}
    if ref.namespace:
        parent["namespace"] = ref.namespace
    if ref.section_name:
        parent["sectionName"] = ref.section_name
    return parent


def desired_http_route(m: ModelSpec, owner: Owner) -> dict[str, Any] | None:
    route = m.gateway.route if m.gateway is not None else None
    if route is None:
        return None
    spec: dict[str, Any] = {
        "parentRefs": [_parent(ref) for ref in route.parent_refs],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": route.path_prefix}}],
                   "backendRefs": [{"group": INFERENCE_GROUP, "kind": "InferencePool", "name": m.name}]}],
    }
    if route.hostnames:
        spec["hostnames"] = list(route.hostnames)
    return {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": child_meta(m, owner), "spec": spec}
