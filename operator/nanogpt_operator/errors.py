"""Typed errors of the operator, translated to kopf's retry semantics at each controller's kopf boundary
(`run` in model/reconcile.py and rollout/reconcile.py).

    OperatorError                  base of everything this package raises on purpose
    ├── ConfigError(variable)      a bad NANOGPT_OPERATOR_* environment variable: the operator won't start
    ├── SpecError(path)            a NanoGPTModel or NanoGPTRollout spec that cannot work: retrying won't help
    └── ApiError(status)           the Kubernetes API refused a request
        ├── ConflictError          409: the object already exists (apply turns it into a patch)
        └── TransientApiError      429, 5xx, timeouts, refused connections: retry later
            └── ClientClosedError  the operator is stopping: nothing to retry, nothing to report
"""

from __future__ import annotations


class OperatorError(Exception):
    """Base class of the operator's own errors."""


class ConfigError(OperatorError):
    """An operator setting from the environment is invalid."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class SpecError(OperatorError):
    """A field of a spec is invalid; `path` is the field path, e.g. spec.rollout.maxSurge."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ApiError(OperatorError):
    """The Kubernetes API answered a request with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class ConflictError(ApiError):
    """The object to create already exists."""


class TransientApiError(ApiError):
    """The API is overloaded, unreachable or timed out; the same request may work later."""


class ClientClosedError(TransientApiError):
    """The client was closed because the operator is stopping; a handler still running just ends."""
