"""Wiring: the ecosystem children under kopf against the emulator, with and without their CRDs, and the
operator's own metrics counting those reconciles and served over HTTP."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

import kmock
import pytest
from test_model_kopf import DEPLOY, HPA, model_status, operator

from operator_helpers import Api, eventually, model_path

SERVED = {
    "monitoring.coreos.com/v1/servicemonitors": "ServiceMonitor",
    "inference.networking.k8s.io/v1/inferencepools": "InferencePool",
    "gateway.networking.k8s.io/v1/httproutes": "HTTPRoute",
    "keda.sh/v1alpha1/scaledobjects": "ScaledObject",
}
MONITOR = "/apis/monitoring.coreos.com/v1/namespaces/ml/servicemonitors/llm"
POOL = "/apis/inference.networking.k8s.io/v1/namespaces/ml/inferencepools/llm"
ROUTE = "/apis/gateway.networking.k8s.io/v1/namespaces/ml/httproutes/llm"
SCALED = "/apis/keda.sh/v1alpha1/namespaces/ml/scaledobjects/llm"
SPEC: dict[str, Any] = dict(
    monitoring={"serviceMonitor": {"labels": {"release": "prom"}}},
    gateway={"endpointPicker": {"name": "llm-epp"}, "httpRoute": {"parentRefs": [{"name": "gw"}]}},
    autoscaling={"minReplicas": 1, "maxReplicas": 4, "keda": {"serverAddress": "http://prometheus:9090"}},
)


def serve_crds(emu: kmock.KubernetesEmulator) -> None:
    for key, kind in SERVED.items():
        emu.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=True,
                                                verbs={"get", "list", "create", "patch", "delete"})


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


async def reported(api: Api) -> dict[str, Any]:
    return condition(await model_status(api), "Integrations")


async def test_owned_objects_are_created_and_removed_with_the_spec(emulator, model_body) -> None:
    emu, api = emulator
    serve_crds(emu)
    async with operator(api):
        await api.must("POST", model_path(), model_body(**SPEC))
        for path in (MONITOR, POOL, ROUTE, SCALED):
            obj = await eventually(lambda p=path: api.get(p), what=path)
            assert obj["metadata"]["ownerReferences"][0]["kind"] == "NanoGPTModel"
        # A Deployment's watch event may write a status first (status follows the pods); the handler's
        # status, with the Integrations condition, follows it.
        cond = await eventually(lambda: reported(api), what="the Integrations condition")
        assert cond["status"] == "True"
        assert await api.get(HPA) is None  # KEDA owns the HPA it makes
        deployment = await api.must("GET", DEPLOY)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["inference.networking.k8s.io/engine-type"] == labels["llm-d.ai/engine-type"] == "vllm"
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert {"name": "RATE_LIMIT_KEY", "value": "fairness"} in container["env"]
        await api.must("PATCH", model_path(name="llm"), {"spec": {"gateway": None, "monitoring": None}})

        async def gone() -> bool:
            return await api.get(POOL) is None and await api.get(ROUTE) is None and await api.get(MONITOR) is None

        await eventually(gone, timeout=30, what="the InferencePool, HTTPRoute and ServiceMonitor deleted")
        assert await api.get(SCALED) is not None


async def test_missing_crds_give_a_condition_not_a_crash_loop(emulator, model_body) -> None:
    emu, api = emulator
    async with operator(api) as runner:
        await api.must("POST", model_path(), model_body(**SPEC))
        assert await eventually(lambda: api.get(DEPLOY), what="the Deployment, despite the missing CRDs")

        cond = await eventually(lambda: reported(api), what="the Integrations condition")
        assert (cond["status"], cond["reason"]) == ("False", "CRDNotInstalled")
        for what in ("Prometheus Operator", "Inference Extension", "KEDA"):
            assert what in cond["message"]
        assert (await model_status(api))["phase"] != "Failed"
    assert "PermanentError" not in runner.output and "TemporaryError" not in runner.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def sample(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def at_least(port: int, prefix: str, value: float) -> bool:
    return sample(scrape(port), prefix) >= value


async def test_operator_metrics_count_reconciles_and_drift(emulator, model_body, monkeypatch: pytest.MonkeyPatch) -> None:
    emu, api = emulator
    port = free_port()
    monkeypatch.setenv("NANOGPT_OPERATOR_METRICS_PORT", str(port))
    async with operator(api):
        await api.must("POST", model_path(), model_body())
        await eventually(lambda: api.get(DEPLOY), what="the Deployment")
        ok = 'nanogpt_operator_reconciles_total{kind="NanoGPTModel",result="ok"}'
        await eventually(lambda: at_least(port, ok, 1), what="a counted reconcile")
        await api.must("PATCH", DEPLOY, {"spec": {"replicas": 5}})  # a hand edit: drift
        drift = 'nanogpt_operator_drift_repairs_total{kind="NanoGPTModel"}'
        await eventually(lambda: at_least(port, drift, 1), what="a counted drift repair")
        assert sample(scrape(port), 'nanogpt_operator_reconciles_total{kind="NanoGPTModel",result="error"}') == 0
