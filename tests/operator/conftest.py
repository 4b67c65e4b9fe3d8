"""Fixtures: a NanoGPTModel factory and a kmock Kubernetes emulator with the operator's resources."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import yaml
from operator_helpers import BASE_MODEL, RESOURCES, Api


@pytest.fixture
def model_body() -> Callable[..., dict[str, Any]]:
    """A NanoGPTModel as the API server would hand it over, with `spec` keys overridden."""

    def make(**spec: Any) -> dict[str, Any]:
        body = copy.deepcopy(BASE_MODEL)
        body["spec"].update(copy.deepcopy(spec))
        return body

    return make


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus two API-server habits kopf relies on.

    generateName: kopf names its Events that way. resourceVersion: a new one on every write, since kopf
    waits for the version its own patch produced before it trusts the next watch event. kopf guards its
    finalizer JSON patches with a resourceVersion `test`; a real server answers a stale one with 422 and
    kopf re-reads, but the emulator answers 500 and kopf retries the same patch, so the guard is dropped.
    metadata.generation: bumped by every write to `spec`, which is how status knows a rollout is new.
    Unserved resources: an API server serves only the built-in kinds and those whose CRD is installed, and
    answers 404 to anything else; the emulator would store any object, so a create of a resource missing
    from `resources` answers 404 here (a cluster without the Prometheus Operator's or KEDA's CRDs).
    """

    async def _handle(self, request: Any) -> Any:
        if request.action == kmock.action.CREATE and request.resource is not None and not any(
                resource == request.resource for resource in self._get_resources()):
            raise kmock.KubernetesResourceNotFoundError()
        data, serial = request.data, str(len(list(self)) + 1000)  # monotonic: one per request
        if isinstance(data, list):
            data[:] = [op for op in data if not (isinstance(op, dict) and op.get("op") == "test"
                                                 and op.get("path") == "/metadata/resourceVersion")]
        writes = (kmock.action.CREATE, kmock.action.UPDATE)
        if request.action in writes and isinstance(data, dict):  # not kopf's JSON patches (lists)
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE and not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{serial}"
            meta["resourceVersion"] = serial
            if "spec" in data:
                meta["generation"] = self._generation(request) + 1
        return await super()._handle(request)

    def _generation(self, request: Any) -> int:
        if request.action == kmock.action.CREATE:
            return 0
        try:
            current = self.objects[request.resource, request.namespace, request.name]
            return int(current.get("metadata", {}).get("generation", 1))
        except (KeyError, ValueError):
            return 0


@pytest.fixture
async def emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[kmock.KubernetesEmulator, Api]]:
    """A kmock API server, and a kubeconfig pointing at it for the operator's own client."""
    emu = Emulator()
    for key, info in RESOURCES.items():
        emu.resources[key] = kmock.ResourceInfo(**info)
    # Entering the emulator itself (not only its server) makes a missing object a 404, as in a cluster.
    async with emu, kmock.Server(emu) as server:
        url = str(server.url).rstrip("/")
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": url}}],
            "users": [{"name": "emu", "user": {"token": "test"}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
        }
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.setenv("NANOGPT_OPERATOR_STANDALONE", "true")
        # Off by default: tests run side by side and a fixed port would collide; test_operator_metrics binds one.
        monkeypatch.setenv("NANOGPT_OPERATOR_METRICS_PORT", "0")
        async with aiohttp.ClientSession() as session:
            yield emu, Api(session, url)
