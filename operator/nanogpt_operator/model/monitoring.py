"""spec.monitoring: the Prometheus Operator object that scrapes one model's pods. Pure builders.

The relabelings give every series the labels the dashboard and alerts group by (manifests/monitoring/):
`namespace`, `pod`, and `model` (the pod label app.kubernetes.io/instance, i.e. the NanoGPTModel's name).
The Prometheus Operator adds namespace and pod on its own too; writing them here keeps the contract in one
place and the same for both kinds.
"""

from __future__ import annotations

from typing import Any

from nanogpt_operator.model.build import Owner, child_meta, pod_labels
from nanogpt_operator.model.spec import ModelSpec

MONITORING_API = "monitoring.coreos.com/v1"
METRICS_PATH = "/metrics"
PORT_NAME = "http"  # the server container's port and the Service's port share this name (build.py)
# Prometheus' service-discovery meta label of the pod label app.kubernetes.io/instance (label names are
# sanitised: `.`, `/` and `-` become `_`); endpoints discovery (ServiceMonitor) and pod discovery
# (PodMonitor) both set it.
INSTANCE_META = "__meta_kubernetes_pod_label_app_kubernetes_io_instance"


def relabelings() -> list[dict[str, Any]]:
    return [
        {"sourceLabels": ["__meta_kubernetes_namespace"], "targetLabel": "namespace", "action": "replace"},
        {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "pod", "action": "replace"},
        {"sourceLabels": [INSTANCE_META], "targetLabel": "model", "action": "replace"},
    ]


def _endpoint(m: ModelSpec) -> dict[str, Any]:
    assert m.monitoring is not None
    return {"port": PORT_NAME, "path": METRICS_PATH, "interval": m.monitoring.interval,
            "relabelings": relabelings()}


def desired_monitor(m: ModelSpec, owner: Owner) -> dict[str, Any] | None:
    """A ServiceMonitor (selecting the model's Service) or a PodMonitor (its pods), or None."""
    if m.monitoring is None:
        return None
    meta = child_meta(m, owner)
    meta["labels"].update(m.monitoring.labels)
    spec: dict[str, Any] = {"selector": {"matchLabels": pod_labels(m.name)},
                            "namespaceSelector": {"matchNames": [m.namespace]}}
    if m.monitoring.kind == "ServiceMonitor":
        spec["endpoints"] = [_endpoint(m)]
    else:
        spec["podMetricsEndpoints"] = [_endpoint(m)]
    return {"apiVersion": MONITORING_API, "kind": m.monitoring.kind, "metadata": meta, "spec": spec}
