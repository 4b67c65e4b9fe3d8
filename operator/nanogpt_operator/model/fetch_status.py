"""The fetch of a remote checkpoint, as the pods' init containers report it. Pure.

The fetch container (model/fetch_build.py) ends by writing its final JSON status to
/dev/termination-log, which the kubelet copies into `initContainerStatuses[].state.terminated.message`
(`lastState` once it restarts): {"phase": "Fetched", "sha256", "bytes", ...} or {"phase": "Failed",
"reason", "message", "retryable"}. While it runs, its stdout carries one JSON progress line every few seconds
({"phase": "Fetching", "bytes_done", "bytes_total", "rate_bps", "eta_s", ...}, model/fetch/cli.py);
model/fetch_progress.py reads the tail of one fetching pod's log and `parse_progress` turns it into
the byte counts of status.fetch. Only numbers are taken from the log, never its uri or file name.
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
    progress: FetchProgress | None = None  # Fetching only: the last progress line of the pod's log

    def as_status(self, uri: str) -> dict[str, Any]:
        out = {"phase": self.phase, "uri": uri, "pod": self.pod, "sha256": self.sha256, "bytes": self.bytes,
               "reason": self.reason, "message": self.message,
               "retryable": self.retryable if self.phase == "Failed" else None}
        if self.progress is not None:
            out.update(self.progress.as_status())
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class FetchProgress:
    """Where a running fetch stands, from its own progress line (the file it is on, for a directory)."""

    done_bytes: int
    total_bytes: int | None
    rate_bps: int | None
    eta_s: int | None

    def as_status(self) -> dict[str, Any]:
        return {"doneBytes": self.done_bytes, "totalBytes": self.total_bytes,
                "rateBytesPerSecond": self.rate_bps, "etaSeconds": self.eta_s}


def _count(value: Any) -> int | None:
    """A non-negative number from the log as an int; None for anything else (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**63:
        return None
    return int(value)


def _progress_line(line: str) -> FetchProgress | None:
    try:
        report = json.loads(line)
    except ValueError:
        return None
    if not isinstance(report, dict) or report.get("phase") != "Fetching":
        return None
    done, total = _count(report.get("bytes_done")), _count(report.get("bytes_total"))
    if done is None or (total is not None and done > total):
        return None
    return FetchProgress(done, total, _count(report.get("rate_bps")), _count(report.get("eta_s")))


def parse_progress(log: str) -> FetchProgress | None:
    """The last well-formed progress line of a fetch container's log tail, or None.

    The tail interleaves the JSON lines (stdout) with human-readable logging (stderr), and limitBytes
    may cut a line in two; a fetcher from before the JSON lines logs only prose. All those are skipped."""
    for line in reversed(log.splitlines()):
        progress = _progress_line(line.strip())
        if progress is not None:
            return progress
    return None


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
