"""Helpers for the operator tests: polling, raw API calls, and the emulator's resource table."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
import kopf
from kopf.testing import KopfRunner

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "nanogptmodels.yaml"
K8S_VERSION = "1.30"

BASE_MODEL: dict[str, Any] = {
    "apiVersion": "nanogpt.dev/v1alpha1",
    "kind": "NanoGPTModel",
    "metadata": {"name": "llm", "namespace": "ml", "uid": "0b5e2c1a-0000-4000-8000-000000000001", "generation": 1,
                 "resourceVersion": "1"},
    "spec": {"checkpoint": {"claimName": "model-pvc", "path": "log/model_40000.pt"}},
}


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = await check()
            if result:
                return result
        except (KeyError, IndexError, TypeError, AssertionError) as err:
            last_error = err
        await asyncio.sleep(0.05)  # a poll interval, not a wait for an outcome
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_error!r}")


# The resources the operator and kopf touch; kopf only starts watching when discovery finds
# namespaces and CRDs as well.
RESOURCES: dict[str, dict[str, Any]] = {
    "nanogpt.dev/v1alpha1/nanogptmodels": dict(kind="NanoGPTModel", namespaced=True, shortnames={"ngm"},
                                               verbs={"list", "watch", "get", "patch", "create", "delete"},
                                               subresources={"status", "scale"}),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True,
                                verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/services": dict(kind="Service", namespaced=True, verbs={"get", "list", "create", "patch", "delete"}),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", namespaced=True,
                                      verbs={"get", "list", "create", "patch", "delete"}),
    "autoscaling/v2/horizontalpodautoscalers": dict(kind="HorizontalPodAutoscaler", namespaced=True,
                                                    verbs={"get", "list", "create", "patch", "delete"}),
    "policy/v1/poddisruptionbudgets": dict(kind="PodDisruptionBudget", namespaced=True,
                                           verbs={"get", "list", "create", "patch", "delete"}),
    "v1/pods": dict(kind="Pod", namespaced=True, verbs={"get", "list", "create", "patch", "delete"}),
    "v1/events": dict(kind="Event", namespaced=True, verbs={"create", "list"}),
    "v1/namespaces": dict(kind="Namespace", namespaced=False, verbs={"list", "watch", "get"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(kind="CustomResourceDefinition", namespaced=False,
                                                              verbs={"list", "watch", "get"}),
    "kopf.dev/v1/clusterkopfpeerings": dict(kind="ClusterKopfPeering", namespaced=False,
                                            verbs={"list", "watch", "get", "patch", "create"}),
}


@contextlib.asynccontextmanager
async def serve_loopback(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 (a free port) and yield its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class Api:
    """Raw HTTP calls against the emulator, the way kubectl and the controllers would make them."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base.rstrip("/")

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, self.base + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, path: str) -> Any:
        status, data = await self.call("GET", path)
        return data if status == 200 else None

    async def must(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.call(method, path, body)
        assert status < 300, (method, path, status, data)
        return data


def model_path(namespace: str = "ml", name: str = "") -> str:
    path = f"/apis/nanogpt.dev/v1alpha1/namespaces/{namespace}/nanogptmodels"
    return f"{path}/{name}" if name else path




@contextlib.asynccontextmanager
async def kopf_running(registry: kopf.OperatorRegistry, server: str, *, settings: kopf.OperatorSettings | None = None,
                       verbose: bool = False) -> AsyncIterator[KopfRunner]:
    """kopf running `registry`'s handlers against the emulator at `server`, in its own thread and loop.

    It logs in through a test-only handler: kopf's own login would read KUBECONFIG as the
    kubernetes package saw it at import time. Entered and left from a worker thread, because
    the emulator serves kopf from the test's event loop."""
    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=server, token="test", insecure=True)

    args = ["run", "--standalone", "--all-namespaces"] + (["--verbose"] if verbose else [])
    runner = KopfRunner(args, registry=registry, settings=settings, timeout=30)
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
    assert runner.exception is None
    assert runner.exit_code == 0
