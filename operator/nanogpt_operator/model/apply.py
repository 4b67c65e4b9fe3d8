"""The one place that creates, patches and deletes children.

Apply is read-compare-patch: get the live object, create it if missing (a 409 from a racing writer
becomes a patch), otherwise send the smallest merge patch from `drift.merge_patch`, or nothing at all.
What we sent is kept in an annotation, so the next diff knows which fields are ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nanogpt_operator.api import GROUP, MANAGER
from nanogpt_operator.client import KubeClient
from nanogpt_operator.model.drift import Path, changed_paths, merge_patch
from nanogpt_operator.errors import ConflictError, TransientApiError

LAST_APPLIED = f"{GROUP}/last-applied"
_LAST_APPLIED_PATH = f"metadata.annotations.{LAST_APPLIED}"
Action = Literal["created", "patched", "unchanged", "deleted"]


@dataclass(frozen=True)
class Applied:
    """What apply did to one child; `drift` means live had been changed by someone else."""

    kind: str
    name: str
    action: Action
    paths: tuple[str, ...] = ()
    drift: bool = False

    def describe(self) -> str:
        fields = f" ({', '.join(self.paths)})" if self.paths else ""
        return f"{self.action} {self.kind} {self.name}{fields}"


def with_last_applied(desired: Mapping[str, Any]) -> dict[str, Any]:
    body = json.loads(json.dumps(desired))  # a deep copy that is also proof the object is plain JSON
    record = json.dumps(desired, sort_keys=True, separators=(",", ":"))
    body["metadata"].setdefault("annotations", {})[LAST_APPLIED] = record
    return body


def last_applied_of(live: Mapping[str, Any]) -> dict[str, Any] | None:
    raw = ((live.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None  # edited by hand into garbage: diff against desired alone
    return value if isinstance(value, dict) else None


async def apply(client: KubeClient, desired: Mapping[str, Any], *, keep: frozenset[Path] = frozenset(),
                create_only: bool = False) -> Applied:
    """Make one child match `desired`. `create_only` children (PVCs: immutable spec) are never patched."""
    kind, meta = desired["kind"], desired["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    body = with_last_applied(desired)
    live = await client.get(kind, namespace, name)
    if live is None:
        try:
            await client.create(body)
            return Applied(kind, name, "created")
        except ConflictError:
            live = await client.get(kind, namespace, name)
            if live is None:  # created and deleted again between our two requests
                raise TransientApiError(409, "Conflict", f"{kind} {name} is being replaced") from None
    if create_only:
        return Applied(kind, name, "unchanged")
    patch = merge_patch(body, live, last_applied_of(live), keep)
    if not patch:
        return Applied(kind, name, "unchanged")
    await client.patch(kind, namespace, name, patch)
    paths = tuple(p for p in changed_paths(patch) if p != _LAST_APPLIED_PATH)
    # Our annotation unchanged means the spec did not change: live was edited behind our back.
    return Applied(kind, name, "patched", paths, drift=_LAST_APPLIED_PATH not in changed_paths(patch))


async def remove(client: KubeClient, kind: str, namespace: str, name: str) -> Applied | None:
    """Delete an optional child the spec no longer wants, but only if we manage it."""
    live = await client.get(kind, namespace, name)
    labels = ((live or {}).get("metadata") or {}).get("labels") or {}
    if live is None or labels.get("app.kubernetes.io/managed-by") != MANAGER:
        return None
    if not await client.delete(kind, namespace, name):
        return None
    return Applied(kind, name, "deleted")


async def ensure_peering(client: KubeClient, name: str) -> bool:
    """Create kopf's ClusterKopfPeering object if missing (True if created).

    Done by the operator rather than the manifests: a custom object cannot be applied in the same
    `kubectl apply -k` as its CRD, which is not yet established at that moment.
    """
    try:
        await client.create({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                             "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": MANAGER}}})
    except ConflictError:
        return False
    return True
