"""Operator settings: built once in the startup handler from NANOGPT_OPERATOR_* variables.

This is the only module that reads the environment. Every setting is a typed attribute of one frozen
`OperatorConfig`; a bad value raises `ConfigError` naming the variable, so the operator never starts
half-configured (kopf does not touch the API until the startup handlers succeed).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from nanogpt_operator.errors import ConfigError

PREFIX = "NANOGPT_OPERATOR_"


@dataclass(frozen=True)
class OperatorConfig:
    """How this operator process peers, talks to the API and identifies itself."""

    # Name of the ClusterKopfPeering object shared by all replicas (manifests/operator/peering.yaml).
    peering_name: str = "nanogpt-operator"
    # Highest priority wins; the others pause. Distinct per replica (random unless set).
    priority: int = 0
    # Run without peering (one replica, local development, tests).
    standalone: bool = False
    # Seconds before a single API request is abandoned and retried as a transient error.
    request_timeout_s: float = 30.0
    # Recorded in managedFields of every object the operator creates or patches.
    field_manager: str = "nanogpt-operator"
    # Port of the operator's own /metrics (nanogpt_operator_*); 0 turns the endpoint off.
    metrics_port: int = 8081
    # KUBECONFIG, read here because the kubernetes package reads it once, at its own import time.
    kubeconfig: str | None = None
    # Server image of a model without spec.image: the GPU build, or the CPU build (prebuilt CPU kernels)
    # for `spec.gpus: 0`, so a CPU-only cluster gets the fast CPU path without naming an image.
    image: str = "nanogpt-server:latest"
    cpu_image: str = "nanogpt-server:latest-cpu"
    # The cluster's DNS domain (kubelet --cluster-domain), for status.endpoint.
    cluster_domain: str = "cluster.local"
    # Bytes of a fetching pod's `fetch` log read for status.fetch.doneBytes (pods/log limitBytes); 0: never read.
    fetch_log_bytes: int = 8192
    # Seconds one such log read may take: it is best effort, and a slow kubelet must not hold up the reconcile.
    fetch_log_timeout_s: float = 5.0


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(PREFIX + name, f"must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(PREFIX + name, f"must be in [{low}, {high}], got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(PREFIX + name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    raise ConfigError(PREFIX + name, f"must be true or false, got {raw!r}")


def _name(env: Mapping[str, str], name: str, default: str, pattern: re.Pattern[str]) -> str:
    value = env.get(PREFIX + name, "").strip() or default
    if not pattern.match(value):
        raise ConfigError(PREFIX + name, f"{value!r} does not match {pattern.pattern}")
    return value


# An image reference has no whitespace; a DNS domain is dot-separated DNS-1123 labels.
_IMAGE = re.compile(r"^\S+$")
_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def config_from_env(env: Mapping[str, str]) -> OperatorConfig:
    """Parse settings from a mapping (os.environ in production, a dict in tests)."""
    # A random priority keeps two replicas of one Deployment from tying: with equal priorities kopf
    # only warns and both would reconcile. 31 bits make a tie vanishingly unlikely.
    random_priority = 1 + secrets.randbelow(2**31 - 2)
    peering_name = env.get(PREFIX + "PEERING", "nanogpt-operator").strip()
    if not peering_name:
        raise ConfigError(PREFIX + "PEERING", "must not be empty (set NANOGPT_OPERATOR_STANDALONE=true instead)")
    timeout = _int(env, "REQUEST_TIMEOUT", 30, 1, 600)
    return OperatorConfig(
        peering_name=peering_name,
        priority=_int(env, "PRIORITY", random_priority, 1, 2**31 - 1),
        standalone=_bool(env, "STANDALONE", False),
        request_timeout_s=float(timeout),
        metrics_port=_int(env, "METRICS_PORT", 8081, 0, 65535),
        kubeconfig=env.get("KUBECONFIG") or None,
        image=_name(env, "IMAGE", OperatorConfig.image, _IMAGE),
        cpu_image=_name(env, "CPU_IMAGE", OperatorConfig.cpu_image, _IMAGE),
        cluster_domain=_name(env, "CLUSTER_DOMAIN", OperatorConfig.cluster_domain, _DOMAIN),
        fetch_log_bytes=_int(env, "FETCH_LOG_BYTES", OperatorConfig.fetch_log_bytes, 0, 1 << 20),
        fetch_log_timeout_s=float(_int(env, "FETCH_LOG_TIMEOUT", 5, 1, 60)),
    )


def load_config() -> OperatorConfig:
    """Settings of this process, from its environment."""
    return config_from_env(os.environ)
