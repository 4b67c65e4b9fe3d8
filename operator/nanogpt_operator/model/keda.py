"""spec.autoscaling.keda: a KEDA ScaledObject (keda.sh/v1alpha1) scaling the Deployment on queue depth.

KEDA queries Prometheus itself, so no prometheus-adapter is needed, and it owns the HPA it creates: the
operator then builds no HPA of its own (build.desired_hpa). The trigger is AverageValue, i.e. waiting
requests per replica, which is also the only metric type KEDA's fallback works with.
"""

from __future__ import annotations

from typing import Any

from nanogpt_operator.model.build import Owner, child_meta
from nanogpt_operator.model.spec import ModelSpec

KEDA_API = "keda.sh/v1alpha1"


def queue_query(m: ModelSpec) -> str:
    """Waiting requests summed over the model's pods; `model` and `namespace` come from spec.monitoring's
    relabelings (model/monitoring.py), so the query names the same labels the dashboard does."""
    assert m.autoscaling is not None and m.autoscaling.keda is not None
    keda = m.autoscaling.keda
    if keda.query:
        return keda.query
    return f'sum({keda.metric}{{namespace="{m.namespace}",model="{m.name}"}})'


def desired_scaled_object(m: ModelSpec, owner: Owner) -> dict[str, Any] | None:
    if m.autoscaling is None or m.autoscaling.keda is None:
        return None
    scaling, keda = m.autoscaling, m.autoscaling.keda
    return {
        "apiVersion": KEDA_API, "kind": "ScaledObject", "metadata": child_meta(m, owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": m.name},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": keda.polling_seconds,
            "cooldownPeriod": keda.cooldown_seconds,
            # Prometheus unreachable for failureThreshold polls: hold this many replicas, not zero or max.
            "fallback": {"failureThreshold": keda.fallback_failures,
                         "replicas": keda.fallback_replicas or scaling.min_replicas},
            "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                "serverAddress": keda.server_address, "query": queue_query(m),
                "threshold": keda.target_queue_depth}}],
        },
    }
