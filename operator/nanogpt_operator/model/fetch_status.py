"""The fetch of a remote checkpoint, as the pods' init containers report it. Pure.

The fetch container (model/fetch_build.py) ends by writing its final JSON status to
/dev/termination-log, which the kubelet copies into `initContainerStatuses[].state.terminated.message`
(`lastState` once it restarts): {"phase": "Fetched", "sha256", "bytes", ...} or {"phase": "Failed",
"reason", "message", "retryable"}. Progress lines go to the log only, which the operator does not read:
while the container runs, the status says Fetching without a byte count.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nanogpt_operator.model.fetch_build import FETCH_CONTAINER

MESSAGE_MAX = 1024  # characters of a fetch error kept in status and conditions


@dataclass(frozen=True)
class FetchState:
    phase: str  # Fetching | Fetched | Failed
    pod: str
    sha256: str | None = None
    bytes: int | None = None
    reason: str | None = None
    message: str | None = None
    retryable: bool = True

    def as_status(self, uri: str) -> dict[str, Any]:
        out = {"phase": self.phase, "uri": uri, "pod": self.pod, "sha256": self.sha256, "bytes": self.bytes,
               "reason": self.reason, "message": self.message,
               "retryable": self.retryable if self.phase == "Failed" else None}
        return {k: v for k, v in out.items() if v is not None}


def _report(terminated: Mapping[str, Any]) -> dict[str, Any]:
    try:
        report = json.loads(terminated.get("message") or "")
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _failed(pod: str, terminated: Mapping[str, Any]) -> FetchState:
    report = _report(terminated)
    reason = str(report.get("reason") or terminated.get("reason") or "FetchFailed")
    text = str(report.get("message") or terminated.get("message") or f"exit code {terminated.get('exitCode')}")
    return FetchState("Failed", pod, reason=reason, message=text.strip()[:MESSAGE_MAX],
                      retryable=bool(report.get("retryable", True)))


def _pod_fetch(pod: Mapping[str, Any]) -> FetchState | None:
    name = (pod.get("metadata") or {}).get("name", "?")
    status = next((s for s in (pod.get("status") or {}).get("initContainerStatuses") or []
                   if s.get("name") == FETCH_CONTAINER), None)
    if status is None:
        return None
    state, last = status.get("state") or {}, (status.get("lastState") or {}).get("terminated") or {}
    now = state.get("terminated") or {}
    if now and now.get("exitCode") == 0:
        report = _report(now)
        size = report.get("bytes")
        return FetchState("Fetched", name, sha256=report.get("sha256"), bytes=size if isinstance(size, int) else None)
    if now:
        return _failed(name, now)
    if "running" in state:
        return FetchState("Fetching", name)
    if last and last.get("exitCode") not in (None, 0):  # waiting to restart (Init:CrashLoopBackOff)
        return _failed(name, last)
    return None  # not started yet (PodInitializing, image pull)


def fetch_state(pods: Sequence[Mapping[str, Any]]) -> FetchState | None:
    """The pods' fetch, worst first: a failure, else one still fetching, else one that fetched."""
    states = [s for s in (_pod_fetch(p) for p in pods) if s is not None]
    for phase in ("Failed", "Fetching", "Fetched"):
        found = next((s for s in states if s.phase == phase), None)
        if found is not None:
            return found
    return None
