"""Typed reading of a custom resource's spec: the one parsing helper of both spec modules.

`Fields` wraps one mapping of the resource with its field path; every getter checks the type (and the
range, pattern or choices it is given) and raises `SpecError` naming the full path, e.g.
`spec.strategy.maxFailures`. The controllers turn a SpecError into `kopf.PermanentError` at their kopf
boundary (model/reconcile.py, rollout/reconcile.py), after recording it in status.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping
from typing import Any

from nanogpt_operator.errors import SpecError

# Kubernetes' own patterns (apimachinery validation): DNS-1123 subdomain and resource.Quantity.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+))?$")
# DNS-1035 label (apimachinery IsDNS1035Label): what a Service name must be.
DNS_LABEL_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
INT32_MAX = 2**31 - 1

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(value: object, path: str) -> int:
    """Seconds from `90`, `"90"`, `"90s"`, `"5m"`, `"1h30m"`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _DURATION.match(value) if isinstance(value, str) and value else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if match is None:
        raise SpecError(path, f"must be a duration such as 30s, 5m or 1h, got {value!r}")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class Fields:
    """Typed access to one mapping of the resource, with the path used in every error."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise SpecError(path, f"must be an object, got {type(data).__name__}")
        self.data = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def child(self, key: str) -> Fields | None:
        """The nested object at `key`, or None when it is absent."""
        value = self.data.get(key)
        return None if value is None else Fields(value, self.at(key))

    def section(self, key: str) -> Fields:
        """The nested object at `key`, empty when it is absent (all of its fields then take defaults)."""
        return self.child(key) or Fields({}, self.at(key))

    def required(self, key: str) -> Any:
        if self.data.get(key) in (None, ""):
            raise SpecError(self.at(key), "is required")
        return self.data[key]

    def str(self, key: str, default: str | None = None, pattern: re.Pattern[str] | None = None,
            choices: tuple[str, ...] | None = None, required: bool = False) -> Any:
        value = self.required(key) if required else self.data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, builtins.str):
            raise SpecError(self.at(key), f"must be a string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise SpecError(self.at(key), f"{value!r} does not match {pattern.pattern}")
        if choices is not None and value not in choices:
            raise SpecError(self.at(key), f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def int(self, key: str, default: int | None, low: int, high: int = INT32_MAX) -> Any:
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, builtins.int):
            raise SpecError(self.at(key), f"must be an integer, got {value!r}")
        if not low <= value <= high:
            raise SpecError(self.at(key), f"must be in [{low}, {high}], got {value}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, builtins.bool):
            raise SpecError(self.at(key), f"must be true or false, got {value!r}")
        return value

    def map(self, key: str) -> dict[str, Any]:
        value = self.data.get(key) or {}
        if not isinstance(value, Mapping):
            raise SpecError(self.at(key), "must be an object")
        return dict(value)

    def list(self, key: str) -> tuple[Any, ...]:
        value = self.data.get(key) or []
        if not isinstance(value, builtins.list):
            raise SpecError(self.at(key), "must be a list")
        return tuple(value)

    def duration(self, key: str, default: int) -> int:
        return parse_duration(self.data.get(key, default), self.at(key))

    def relative_path(self, key: str) -> str:
        value: str = self.str(key, required=True)
        # The path is joined under the claim's mount point; absolute paths or '..' would escape it.
        if value.startswith("/") or ".." in value.split("/"):
            raise SpecError(self.at(key), f"must be a path relative to the claim, without '..', got {value!r}")
        return value


# A checkpoint URI (spec.checkpoint.uri of both CRDs). The grammar is model/fetch/uri.py's, which the
# operator cannot import (the model package loads torch); tests/operator/test_checkpoint_uri.py checks that
# both give the same verdict on a table of URIs, and the CRDs' CEL rules repeat these patterns (RE2: no
# look-arounds, hence the separate checks on '--' and '..').
_HF_NAME = r"[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
URI_PATTERNS: dict[builtins.str, re.Pattern[builtins.str]] = {
    "https": re.compile(rf"^https?://([^\s/@:?#\[\]]+|\[[0-9A-Fa-f:.]+\])(:{_PORT})?/[^\s?#]+(\?\S*)?(#\S*)?$"),
    "s3": re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/([^/\s]\S*|/\S+)$"),
    "hf": re.compile(rf"^hf://{_HF_NAME}/{_HF_NAME}(@[^/\s]+)?(/\S*)?$"),
    "pvc": re.compile(r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[^\s/]\S*$"),
}
# Hub names may not hold '--' or '..' (huggingface_hub's validate_repo_id); only models, not datasets/spaces.
_HF_BAD = re.compile(r"^hf://(([^/]+/)?[^/@]*(--|[.][.])|(datasets|spaces)/)")
_DOTDOT = re.compile(r"(^|/)[.][.](/|$)")
SHA256 = re.compile(r"^(sha256:)?[0-9a-fA-F]{64}$")
URI_FORMS = "https://host/path, http://host/path (with allowHttp), s3://bucket/key, hf://org/repo[@revision][/path] " \
            "or pvc://claim/path"


def uri_problem(uri: builtins.str, allow_http: builtins.bool) -> builtins.str | None:
    """Why `uri` is not a checkpoint URI the fetcher (or, for pvc://, the operator) accepts; None if it is."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "http" and not allow_http:
        return "plain http:// is refused (the weights would travel unencrypted): use https://, or set allowHttp: true"
    pattern = URI_PATTERNS.get("https" if scheme in ("http", "https") else scheme)
    if pattern is None:
        return f"unsupported scheme {scheme + '://' if scheme else 'in ' + repr(uri)}: expected {URI_FORMS}"
    if not pattern.match(uri) or (scheme == "hf" and _HF_BAD.match(uri)):
        return f"{uri!r} is not a valid {scheme}:// URI: expected {URI_FORMS}"
    rest = uri.split("://", 1)[1]
    if scheme in ("hf", "pvc") and _DOTDOT.search(rest.split("/", 2 if scheme == "hf" else 1)[-1]):
        return f"{uri!r} has '..' in its path"
    return None


# spec.checkpoint's fields that go with a fetched uri (not pvc://), in a NanoGPTModel and a NanoGPTRollout.
REMOTE_FIELDS = ("sha256", "allowHttp", "endpoint", "secretRef", "cache", "fetchResources")


def pvc_target(uri: builtins.str) -> tuple[builtins.str, builtins.str]:
    """(claim, path) of a pvc://claim/path uri that uri_problem accepted."""
    claim, path = uri[len("pvc://"):].split("/", 1)
    return claim, path


def display_source(text: builtins.str) -> builtins.str:
    """A checkpoint source as status and pod annotations show it: a URI's query (a pre-signed URL's
    signature, a credential) is cut to '?…'."""
    return text.split("?", 1)[0] + "?…" if "://" in text and "?" in text else text


def is_uri(text: builtins.str) -> builtins.bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text))
