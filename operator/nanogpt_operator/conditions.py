"""Kubernetes-style status conditions, shared by both resources' status. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def condition(kind: str, ok: bool, reason: str, message: str, generation: int,
              previous: Sequence[Mapping[str, Any]], now: str) -> dict[str, Any]:
    """A standard condition; lastTransitionTime only moves when the status flips."""
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == kind), {})
    since = before.get("lastTransitionTime") if before.get("status") == status else None
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since or now, "observedGeneration": generation}
