"""The API client of the NanoGPTRollout controller: the operator's KubeClient plus cluster-wide reads.

A rollout reads every NanoGPTModel, NanoGPTRollout and Namespace in the cluster, and writes only
NanoGPTModels (the lock annotation and spec.checkpoint), as merge patches. For the smoke test of a model
with spec.server.apiKeySecretRef it reads that one Secret (a `get` by name; RBAC grants no list or watch).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from nanogpt_operator.api import models_path, rollouts_path
from nanogpt_operator.client import MERGE_PATCH, KubeClient


class RolloutClient(KubeClient):
    """KubeClient plus the cluster-wide reads and model patches a rollout needs."""

    async def _items(self, path: str) -> list[dict[str, Any]]:
        data = await self._request("GET", path)
        return list(data.get("items") or [])

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._items(models_path())

    async def list_rollouts(self) -> list[dict[str, Any]]:
        return await self._items(rollouts_path())

    async def namespace_labels(self) -> dict[str, dict[str, str]]:
        return {ns["metadata"]["name"]: dict(ns["metadata"].get("labels") or {})
                for ns in await self._items("/api/v1/namespaces")}

    async def api_key(self, namespace: str, secret: str, key: str) -> str | None:
        """The first key of a model's API-key Secret (one per line, '#' comments, as the server reads it)."""
        obj = await self.get("Secret", namespace, secret)
        raw = ((obj or {}).get("data") or {}).get(key)
        if not raw:
            return None
        try:
            text = base64.b64decode(raw).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return next((line.strip() for line in text.splitlines()
                     if line.strip() and not line.strip().startswith("#")), None)

    async def patch_model(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """A merge patch; with metadata.resourceVersion in it the API refuses (409) a stale write."""
        await self._request("PATCH", models_path(namespace, name),
                            body=patch, params={"fieldManager": self._field_manager}, content_type=MERGE_PATCH)
