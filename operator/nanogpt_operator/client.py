"""A small async Kubernetes client for the operator's children, over aiohttp.

kopf watches and patches the NanoGPTModel itself; this client reads and writes the children. It finds
the cluster the way kopf and kubectl do (in-cluster service account, else KUBECONFIG) through the
`kubernetes` package's loaders, and it translates every HTTP and network failure into the typed errors
of `errors.py` here, at one boundary, so no other module sees aiohttp.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from nanogpt_operator.api import models_path
from nanogpt_operator.config import OperatorConfig
from nanogpt_operator.errors import ApiError, ClientClosedError, ConflictError, TransientApiError

# kind -> (apiVersion, plural): only the kinds the operator manages or reads (and that RBAC allows).
KINDS: dict[str, tuple[str, str]] = {
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "Pod": ("v1", "pods"),
    # Read by name only: the API-key Secret a model references, for the rollout's smoke test.
    "Secret": ("v1", "secrets"),
    # From optional CRDs (model/integrations.py): a cluster without them answers 404.
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors"),
    "PodMonitor": ("monitoring.coreos.com/v1", "podmonitors"),
    "InferencePool": ("inference.networking.k8s.io/v1", "inferencepools"),
    "HTTPRoute": ("gateway.networking.k8s.io/v1", "httproutes"),
    "ScaledObject": ("keda.sh/v1alpha1", "scaledobjects"),
    # Cluster-scoped: kopf's peering object, which the operator creates at startup if missing.
    "ClusterKopfPeering": ("kopf.dev/v1", "clusterkopfpeerings"),
}
MERGE_PATCH = "application/merge-patch+json"


def collection_path(kind: str, namespace: str | None) -> str:
    api_version, plural = KINDS[kind]
    root = "/api" if "/" not in api_version else "/apis"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{root}/{api_version}{scope}/{plural}"


def error_for(status: int, body: Any) -> ApiError:
    """Map an HTTP error status to the typed error that says whether a retry can help."""
    body = body if isinstance(body, Mapping) else {}
    reason, message = str(body.get("reason", "")), str(body.get("message", ""))
    if status == 409:
        return ConflictError(status, reason or "Conflict", message)
    if status == 429 or status >= 500:
        return TransientApiError(status, reason or "ServerError", message)
    return ApiError(status, reason or "Error", message)


def _ssl_context(cfg: Any) -> ssl.SSLContext | bool:
    if not cfg.verify_ssl:
        return False
    context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    if cfg.cert_file:
        context.load_cert_chain(cfg.cert_file, cfg.key_file)
    return context


def load_cluster_config(kubeconfig: str | None) -> Any:
    """The cluster's address and credentials: in-cluster first, then KUBECONFIG / ~/.kube/config."""
    import kubernetes.client
    import kubernetes.config

    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return cfg


async def _json_or_none(response: aiohttp.ClientResponse) -> Any:
    """An error body that may not be JSON (a log endpoint's proxy answering in text)."""
    try:
        return await response.json(content_type=None)
    except ValueError:
        return None


class KubeClient:
    """Namespaced get/list/create/patch/delete of the child kinds, returning plain dicts."""

    def __init__(self, session: aiohttp.ClientSession, server: str,
                 authorization: Callable[[], str | None], field_manager: str) -> None:
        self._session = session
        self._server = server.rstrip("/")
        # Called per request: the in-cluster loader re-reads the rotating service-account token.
        self._authorization = authorization
        self._field_manager = field_manager
        # Requests in flight, so that `close` lets them finish instead of failing them mid-way.
        self._inflight = 0
        self._closing = False
        self._idle = asyncio.Condition()

    @classmethod
    async def connect(cls, config: OperatorConfig) -> KubeClient:
        cfg = await asyncio.to_thread(load_cluster_config, config.kubeconfig)
        timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
        connector = aiohttp.TCPConnector(ssl=_ssl_context(cfg))
        session = aiohttp.ClientSession(connector=connector, timeout=timeout)

        def authorization() -> str | None:
            return cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")

        return cls(session, cfg.host, authorization, config.field_manager)

    @property
    def closed(self) -> bool:
        return self._session.closed or self._closing

    async def close(self, wait_s: float = 10.0) -> None:
        """Refuse new requests, let those in flight finish (up to `wait_s`), then close the session."""
        self._closing = True
        try:
            async with self._idle:
                await asyncio.wait_for(self._idle.wait_for(lambda: self._inflight == 0), wait_s)
        except asyncio.TimeoutError:
            pass  # a hung request must not keep the operator from exiting
        await self._session.close()

    async def _request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                       content_type: str = "application/json", text: bool = False,
                       timeout_s: float | None = None) -> Any:
        if self.closed:  # the operator is stopping while a timer still runs
            raise ClientClosedError(0, "ClientClosed", "the operator is shutting down")
        self._inflight += 1
        try:
            return await self._send(method, path, body, params, content_type, text, timeout_s)
        finally:
            self._inflight -= 1
            async with self._idle:
                self._idle.notify_all()

    async def _send(self, method: str, path: str, body: Any, params: Mapping[str, str] | None,
                    content_type: str, text: bool = False, timeout_s: float | None = None) -> Any:
        headers = {"Accept": "*/*" if text else "application/json", "Content-Type": content_type}
        token = self._authorization()
        if token:
            headers["Authorization"] = token
        try:
            # A shorter deadline than the session's for a best-effort read (a pod log through a slow kubelet).
            timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
            async with self._session.request(method, self._server + path, json=body, params=params,
                                             headers=headers, timeout=timeout) as response:
                if text and response.status < 400:
                    return await response.text(errors="replace")
                data = await response.json(content_type=None) if not text else await _json_or_none(response)
                if response.status >= 400:
                    raise error_for(response.status, data)
                return data
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            if self.closed:  # "Connector is closed": the request outlived close()'s wait
                raise ClientClosedError(0, "ClientClosed", "the operator is shutting down") from err
            raise TransientApiError(0, type(err).__name__, str(err) or "request failed") from err

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", f"{collection_path(kind, namespace)}/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        data = await self._request("GET", collection_path(kind, namespace), params={"labelSelector": label_selector})
        items: list[dict[str, Any]] = data.get("items") or []
        # Not every server honours labelSelector (the test emulator does not), so filter here as well.
        return [item for item in items
                if all((item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in selector.items())]

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        result: dict[str, Any] = await self._request(
            "POST", collection_path(obj["kind"], meta.get("namespace")), body=obj,
            params={"fieldManager": self._field_manager})
        return result

    async def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._request(
            "PATCH", f"{collection_path(kind, namespace)}/{name}", body=patch,
            params={"fieldManager": self._field_manager}, content_type=MERGE_PATCH)
        return result

    async def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        """One NanoGPTModel, or None when it is gone."""
        try:
            result: dict[str, Any] = await self._request("GET", models_path(namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise
        return result

    async def patch_status(self, path: str, status: Mapping[str, Any]) -> None:
        """Merge-patch the status subresource of the custom resource at `path` (see api.models_path)."""
        await self._request("PATCH", f"{path}/status", body={"status": dict(status)},
                            params={"fieldManager": self._field_manager}, content_type=MERGE_PATCH)

    async def pod_log(self, namespace: str, name: str, container: str, *, tail_lines: int,
                      limit_bytes: int, timeout_s: float) -> str:
        """The last `tail_lines` lines of one container's log, at most `limit_bytes` bytes (pods/log get)."""
        params = {"container": container, "tailLines": str(tail_lines), "limitBytes": str(limit_bytes)}
        result: str = await self._request("GET", f"{collection_path('Pod', namespace)}/{name}/log", params=params,
                                          text=True, timeout_s=timeout_s)
        return result

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete if present; False when it was already gone."""
        try:
            await self._request("DELETE", f"{collection_path(kind, namespace)}/{name}")
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True
