"""Checkpoints from anywhere: local paths, https://, s3:// and hf:// URIs, fetched resumably, verified
and cached by content. See docs/checkpoints.md.

    from model.fetch import fetch, resolve_checkpoint
    fetch("hf://openai-community/gpt2", "/models/gpt2")             # what `python -m model fetch` does
    local = resolve_checkpoint("https://example.com/ckpt.pt")      # what load_model_from_checkpoint does

Modules: uri (the grammar), config (settings from the environment), errors (why a fetch failed),
transfer (resume, retry, progress, verify), http / s3 / hf (one backend each), cache (layout, locks),
place (atomic placement), fetcher (the pipeline), cli (`python -m model fetch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import FetchConfigError, FetchSettings
from .errors import (AccessDenied, FetchError, InvalidSource, NotFound, Stalled, StorageError, TLSError, Unreachable,
                     VerificationFailed)
from .fetcher import FetchResult, fetch
from .uri import LocalSource, is_uri, parse_source


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path  # what the loader reads
    name: str | None  # a short model name from the URI (None: let the loader derive it from the path)
    provenance: dict  # merged into CheckpointInfo.source: the URI, its digest, the Hub commit


def resolve_checkpoint(text: str | Path, settings: FetchSettings | None = None) -> ResolvedCheckpoint:
    """A local path as it is; a URI fetched into the cache (once) and returned as a local snapshot."""
    if not is_uri(text):
        source = parse_source(text)
        return ResolvedCheckpoint(source.path if isinstance(source, LocalSource) else Path(str(text)), None, {})
    result = fetch(text, None, settings=settings)
    return ResolvedCheckpoint(result.path, result.name,
                              {"uri": result.uri, "fetched_sha256": result.sha256, **result.provenance})


def check_source(text: str, settings: FetchSettings | None = None) -> None:
    """Raise InvalidSource (a ValueError) if `text` is not a path or URI the fetcher accepts."""
    settings = settings or FetchSettings.from_env()
    parse_source(text, settings.allow_http)


__all__ = [
    "fetch", "resolve_checkpoint", "check_source", "parse_source", "is_uri",
    "FetchResult", "ResolvedCheckpoint", "FetchSettings", "FetchConfigError",
    "FetchError", "InvalidSource", "NotFound", "AccessDenied", "Unreachable", "Stalled", "TLSError",
    "VerificationFailed", "StorageError",
]
