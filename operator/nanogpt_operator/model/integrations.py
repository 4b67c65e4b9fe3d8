"""The ecosystem children of a NanoGPTModel (monitoring, gateway, KEDA), and applying them.

Their kinds come from CRDs a cluster may not have (the Prometheus Operator's, the Gateway API's and its
Inference Extension's, KEDA's). The API answers 404 for a resource it does not serve; that is reported as
the `Integrations` condition naming what to install, while the Deployment and Service still converge: a
missing optional CRD must not hold the model hostage nor loop the operator in retries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nanogpt_operator.client import KubeClient
from nanogpt_operator.conditions import condition
from nanogpt_operator.errors import ApiError
from nanogpt_operator.model.apply import Applied, apply, remove
from nanogpt_operator.model.build import Owner
from nanogpt_operator.model.gateway import desired_http_route, desired_inference_pool
from nanogpt_operator.model.keda import desired_scaled_object
from nanogpt_operator.model.monitoring import desired_monitor
from nanogpt_operator.model.spec import ModelSpec

# kind -> (what provides its CRD, the spec field that asks for it)
PROVIDERS: dict[str, tuple[str, str]] = {
    "ServiceMonitor": ("the Prometheus Operator's CRDs (monitoring.coreos.com)", "spec.monitoring"),
    "PodMonitor": ("the Prometheus Operator's CRDs (monitoring.coreos.com)", "spec.monitoring"),
    "InferencePool": ("the Gateway API Inference Extension's CRDs (inference.networking.k8s.io)", "spec.gateway"),
    "HTTPRoute": ("the Gateway API's CRDs (gateway.networking.k8s.io)", "spec.gateway.httpRoute"),
    "ScaledObject": ("KEDA (keda.sh)", "spec.autoscaling.keda"),
}
BUILDERS: tuple[Callable[[ModelSpec, Owner], dict[str, Any] | None], ...] = (
    desired_monitor, desired_inference_pool, desired_http_route, desired_scaled_object)


@dataclass(frozen=True)
class Integrated:
    results: tuple[Applied, ...]
    missing: tuple[str, ...]  # kinds whose CRD this cluster does not serve


def desired_integrations(m: ModelSpec, owner: Owner) -> list[dict[str, Any]]:
    built = [build(m, owner) for build in BUILDERS]
    return [obj for obj in built if obj is not None]


def unwanted_integrations(m: ModelSpec) -> list[tuple[str, str]]:
    wanted = {obj["kind"] for obj in desired_integrations(m, Owner(name=m.name, uid=""))}
    return [(kind, m.name) for kind in PROVIDERS if kind not in wanted]


def _not_served(err: ApiError) -> bool:
    # A resource the API does not know answers 404 with reason NotFound; so does a namespace that is gone,
    # but then the model itself is gone too.
    return err.status == 404


async def apply_integrations(client: KubeClient, m: ModelSpec, owner: Owner) -> Integrated:
    results: list[Applied] = []
    missing: list[str] = []
    for obj in desired_integrations(m, owner):
        try:
            results.append(await apply(client, obj))
        except ApiError as err:
            if not _not_served(err):
                raise
            missing.append(obj["kind"])
    for kind, name in unwanted_integrations(m):
        try:
            removed = await remove(client, kind, m.namespace, name)
        except ApiError as err:
            if not (_not_served(err) or err.status == 403):  # no CRD (or no RBAC for it): nothing of ours
                raise
            continue
        if removed is not None:
            results.append(removed)
    return Integrated(tuple(results), tuple(missing))


def missing_message(missing: Sequence[str]) -> str:
    parts = [f"{kind} is not served by this cluster: install {PROVIDERS[kind][0]}; "
             f"{PROVIDERS[kind][1]} has no effect until then" for kind in missing]
    return "; ".join(parts)


def integrations_condition(m: ModelSpec, missing: Sequence[str], generation: int,
                           previous: Mapping[str, Any], now: str) -> dict[str, Any] | None:
    """The Integrations condition, or None when the spec asks for none of them."""
    if not desired_integrations(m, Owner(name=m.name, uid="")):
        return None
    old = previous.get("conditions") or []
    if missing:
        return condition("Integrations", False, "CRDNotInstalled", missing_message(missing), generation, old, now)
    kinds = ", ".join(obj["kind"] for obj in desired_integrations(m, Owner(name=m.name, uid="")))
    return condition("Integrations", True, "Applied", f"created and kept in sync: {kinds}", generation, old, now)
