"""The spec sections that hook a NanoGPTModel into the cluster's ecosystem, parsed into typed values.

    spec.monitoring             a Prometheus Operator ServiceMonitor or PodMonitor for the model's pods
    spec.gateway                a Gateway API Inference Extension InferencePool (and optionally an HTTPRoute)
    spec.autoscaling.keda       a KEDA ScaledObject on queue depth instead of an HPA

Kept apart from spec.py so each section is one small dataclass and one parser; spec.py calls the parsers.
Defaults equal the CRD's (crds/nanogptmodels.yaml).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from nanogpt_operator.errors import SpecError
from nanogpt_operator.fields import DNS_SUBDOMAIN, Fields

# Prometheus' duration syntax, as the Prometheus Operator's CRDs validate `interval`.
PROM_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HTTP_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")
FAILURE_MODES = ("FailClose", "FailOpen")
# The two queue-depth series the server exports (server/metrics.py): ours and vLLM's name for it.
QUEUE_METRICS = ("nanogpt_num_requests_waiting", "vllm:num_requests_waiting")
SCALE_TO_ZERO = ("0 (scale to zero) is not supported: the server does not hold requests while a replica "
                 "starts, so every request sent to a model at zero replicas would fail; use 1 or more")


@dataclass(frozen=True)
class MonitorSpec:
    """spec.monitoring: which Prometheus Operator object scrapes the pods, and how often."""

    kind: str  # ServiceMonitor | PodMonitor
    interval: str = "30s"
    labels: Mapping[str, str] = field(default_factory=dict)  # e.g. release: kube-prometheus-stack


@dataclass(frozen=True)
class ParentRef:
    name: str
    namespace: str | None = None
    section_name: str | None = None


@dataclass(frozen=True)
class HttpRouteSpec:
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...] = ()
    path_prefix: str = "/"


@dataclass(frozen=True)
class GatewaySpec:
    """spec.gateway: the InferencePool's endpoint picker (an EPP Service) and an optional HTTPRoute."""

    picker_name: str
    picker_port: int = 9002
    failure_mode: str = "FailClose"
    route: HttpRouteSpec | None = None


@dataclass(frozen=True)
class KedaSpec:
    """spec.autoscaling.keda: scale on the Prometheus queue-depth series instead of CPU."""

    server_address: str
    metric: str = QUEUE_METRICS[0]
    query: str | None = None  # overrides the query built from `metric`
    target_queue_depth: str = "4"  # waiting requests per replica
    polling_seconds: int = 15
    cooldown_seconds: int = 300
    fallback_failures: int = 3
    fallback_replicas: int | None = None  # None: minReplicas


def parse_monitoring(f: Fields | None) -> MonitorSpec | None:
    if f is None:
        return None
    service, pod = f.child("serviceMonitor"), f.child("podMonitor")
    if service is not None and pod is not None:
        raise SpecError(f.path, "set serviceMonitor or podMonitor, not both")
    chosen, kind = (service, "ServiceMonitor") if service is not None else (pod, "PodMonitor")
    if chosen is None:
        return None
    labels = chosen.map("labels")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise SpecError(f"{chosen.at('labels')}.{key}", f"must be a string, got {value!r}")
    return MonitorSpec(kind=kind, interval=chosen.str("interval", "30s", pattern=PROM_DURATION), labels=labels)


def _parse_route(f: Fields | None) -> HttpRouteSpec | None:
    if f is None:
        return None
    refs = []
    for i, raw in enumerate(f.list("parentRefs")):
        ref = Fields(raw, f"{f.at('parentRefs')}[{i}]")
        refs.append(ParentRef(name=ref.str("name", required=True, pattern=DNS_SUBDOMAIN),
                              namespace=ref.str("namespace", pattern=DNS_LABEL),
                              section_name=ref.str("sectionName", pattern=DNS_SUBDOMAIN)))
    if not refs:
        raise SpecError(f.at("parentRefs"), "needs at least one Gateway to attach the route to")
    hostnames = tuple(f.list("hostnames"))
    for i, host in enumerate(hostnames):
        if not isinstance(host, str) or not host:
            raise SpecError(f"{f.at('hostnames')}[{i}]", f"must be a hostname, got {host!r}")
    path = f.str("pathPrefix", "/")
    if not path.startswith("/"):
        raise SpecError(f.at("pathPrefix"), f"must start with '/', got {path!r}")
    return HttpRouteSpec(parent_refs=tuple(refs), hostnames=hostnames, path_prefix=path)


def parse_gateway(f: Fields | None) -> GatewaySpec | None:
    if f is None:
        return None
    picker = f.child("endpointPicker")
    if picker is None:
        raise SpecError(f.at("endpointPicker"), "is required: the InferencePool routes through an endpoint picker")
    return GatewaySpec(
        picker_name=picker.str("name", required=True, pattern=DNS_LABEL),
        picker_port=picker.int("port", 9002, 1, 65535),
        failure_mode=picker.str("failureMode", "FailClose", choices=FAILURE_MODES),
        route=_parse_route(f.child("httpRoute")),
    )


def check_min_replicas(f: Fields) -> None:
    """Refuse scale to zero with the reason, before the generic range check says only 'must be >= 1'."""
    if f.data.get("minReplicas") == 0:
        raise SpecError(f.at("minReplicas"), SCALE_TO_ZERO)


def parse_keda(f: Fields | None, max_replicas: int) -> KedaSpec | None:
    if f is None:
        return None
    target = f.data.get("targetQueueDepth", 4)
    if isinstance(target, bool) or not isinstance(target, (int, str)) or not str(target).isdigit() or int(target) < 1:
        raise SpecError(f.at("targetQueueDepth"), f"must be a positive integer, got {target!r}")
    fallback = f.section("fallback")
    keda = KedaSpec(
        server_address=f.str("serverAddress", required=True, pattern=HTTP_URL),
        metric=f.str("metric", QUEUE_METRICS[0], choices=QUEUE_METRICS),
        query=f.str("query"),
        target_queue_depth=str(int(target)),
        polling_seconds=f.int("pollingSeconds", 15, 1, 3600),
        cooldown_seconds=f.int("cooldownSeconds", 300, 0, 86400),
        fallback_failures=fallback.int("failureThreshold", 3, 1, 100),
        fallback_replicas=fallback.int("replicas", None, 1, max_replicas),
    )
    return keda
