"""Fetch settings: one frozen `FetchSettings`, from defaults, then the environment; the only module in
model/fetch that reads os.environ. Credentials are not settings here: boto3 reads the standard AWS
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, ...) and
huggingface_hub reads HF_TOKEN, each from where its users already keep them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping


class FetchConfigError(ValueError):
    """A fetch setting is invalid; names the environment variable and the rule it broke."""

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable, self.problem = variable, problem


@dataclass(frozen=True)
class FetchSettings:
    cache_dir: Path = field(default_factory=lambda: _default_cache_dir(os.environ))
    allow_http: bool = False  # plain http:// sends the weights (and any token) unencrypted
    ca_bundle: Path | None = None  # PEM file of CAs to trust for https:// and s3:// (None: the system's)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # no byte for this long is a stall: the attempt fails and is retried
    retries: int = 5  # attempts after the first, per file, each after a backoff
    backoff_s: float = 1.0  # the first wait; doubled per failed attempt (with jitter) up to backoff_max_s
    backoff_max_s: float = 30.0
    progress_interval_s: float = 5.0
    chunk_bytes: int = 1 << 20
    max_bytes: int = 0  # the largest file accepted; 0: no limit beyond the free disk space
    offline_fallback: bool = True  # source unreachable: use what it gave last, when still cached
    s3_endpoint: str | None = None  # None: boto3's own (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)
    s3_region: str | None = None
    s3_addressing: str = "auto"  # botocore's addressing_style: auto, path or virtual
    s3_anonymous: bool = False  # unsigned requests, for a public bucket
    hf_endpoint: str = "https://huggingface.co"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "FetchSettings":
        """Defaults, then `environ` (default os.environ), then keyword overrides; raises FetchConfigError."""
        environ = os.environ if environ is None else environ
        values: dict = {"cache_dir": _default_cache_dir(environ)}
        for name, env, parse in _ENV:
            raw = environ.get(env)
            if raw is None or not raw.strip():
                continue
            try:
                values[name] = parse(raw.strip())
            except ValueError as err:
                raise FetchConfigError(env, str(err)) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> "FetchSettings":
        return dataclasses.replace(self, **changes)


def _default_cache_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME/nanogpt, else ~/.cache/nanogpt; a user without a home (a container's uid
    10001) gets one under the temporary directory rather than an import-time crash."""
    if environ.get("XDG_CACHE_HOME", "").strip():
        return Path(environ["XDG_CACHE_HOME"].strip()) / "nanogpt"
    home = environ.get("HOME", "").strip() or os.path.expanduser("~")
    if home.startswith("~") or home == "/":
        return Path("/tmp") / "nanogpt-cache"
    return Path(home) / ".cache" / "nanogpt"


def _bool(raw: str) -> bool:
    v = raw.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _number(lo: float, integer: bool = False) -> Callable[[str], float]:
    def parse(raw: str):
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            raise ValueError(f"must be {'an integer' if integer else 'a number'}, got {raw!r}") from None
        if not value >= lo or value == float("inf"):
            raise ValueError(f"must be a finite number >= {lo}, got {raw!r}")
        return value

    return parse


def _addressing(raw: str) -> str:
    if raw not in ("auto", "path", "virtual"):
        raise ValueError(f"must be auto, path or virtual, got {raw!r}")
    return raw


def _endpoint(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, got {raw!r}")
    return raw.rstrip("/")


_ENV: tuple[tuple[str, str, Callable[[str], object]], ...] = (
    ("cache_dir", "NANOGPT_CACHE_DIR", Path),
    ("allow_http", "NANOGPT_FETCH_ALLOW_HTTP", _bool),
    ("ca_bundle", "NANOGPT_FETCH_CA_BUNDLE", Path),
    ("connect_timeout_s", "NANOGPT_FETCH_CONNECT_TIMEOUT", _number(0.001)),
    ("read_timeout_s", "NANOGPT_FETCH_READ_TIMEOUT", _number(0.001)),
    ("retries", "NANOGPT_FETCH_RETRIES", _number(0, integer=True)),
    ("backoff_s", "NANOGPT_FETCH_BACKOFF", _number(0.0)),
    ("backoff_max_s", "NANOGPT_FETCH_BACKOFF_MAX", _number(0.0)),
    ("progress_interval_s", "NANOGPT_FETCH_PROGRESS_INTERVAL", _number(0.0)),
    ("max_bytes", "NANOGPT_FETCH_MAX_BYTES", _number(0, integer=True)),
    ("offline_fallback", "NANOGPT_FETCH_OFFLINE_FALLBACK", _bool),
    ("s3_endpoint", "NANOGPT_S3_ENDPOINT", _endpoint),
    ("s3_region", "NANOGPT_S3_REGION", str),
    ("s3_addressing", "NANOGPT_S3_ADDRESSING", _addressing),
    ("s3_anonymous", "NANOGPT_S3_ANONYMOUS", _bool),
    ("hf_endpoint", "HF_ENDPOINT", _endpoint),  # huggingface_hub's own variable, passed explicitly
)

ENV_VARS = tuple(env for _, env, _ in _ENV)  # for docs and --help
