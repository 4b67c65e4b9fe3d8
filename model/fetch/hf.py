"""hf://org/repo[@revision][/path] through huggingface_hub: its resolve URLs, its metadata HEAD (commit,
etag, size, the LFS redirect) and its token (HF_TOKEN); the bytes then move through transfer.py like any
other download, so a stalled Hub download fails after the read timeout instead of hanging.

A path that is a file is one checkpoint (a nanoGPT ckpt.pt). The repo root or a folder is a GPT-2
directory: config.json and the first of checkpoint.HF_WEIGHTS there (a sharded index brings its shards),
each asked for by name, as transformers does, so nothing but the resolve endpoint is needed. The first
answer's X-Repo-Commit pins every later file to that commit, so a branch that moves mid-fetch cannot
mix two versions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .config import FetchSettings
from .errors import AccessDenied, FetchError, NotFound, Stalled, Unreachable
from .http import HttpClient
from .transfer import Listing, RemoteFile, retrying
from .uri import HfSource

# The names checkpoint.HF_WEIGHTS tries, in its order; kept here so fetching needs no torch import.
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
SHA256 = re.compile(r"[0-9a-f]{64}")


def resolve_hf(source: HfSource, settings: FetchSettings) -> Listing:
    hub = _Hub(source, settings)
    if source.path:
        meta = hub.meta(source.path)
        if meta is not None:
            return Listing([hub.remote(source.path, PurePosixPath(source.path).name, meta)], False, hub.provenance())
    folder = source.path
    config = hub.meta(_join(folder, "config.json"))
    if config is None:
        raise NotFound(source.uri, f"neither a file nor a folder with config.json at {folder or 'the repo root'!r}")
    files = [hub.remote(_join(folder, "config.json"), "config.json", config)]
    for name in WEIGHTS:
        meta = hub.meta(_join(folder, name))
        if meta is None:
            continue
        files.append(hub.remote(_join(folder, name), name, meta))
        if name.endswith(".index.json"):
            files += [hub.remote(_join(folder, shard), shard, hub.meta(_join(folder, shard), required=True))
                      for shard in hub.shards(_join(folder, name))]
        return Listing(files, True, hub.provenance())
    raise NotFound(source.uri, f"config.json but no weights: none of {', '.join(WEIGHTS)}")


@dataclass
class _Hub:
    source: HfSource
    settings: FetchSettings
    commit: str | None = None
    http: HttpClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = HttpClient(self.settings)

    def url(self, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.source.repo_id, path, revision=self.commit or self.source.revision or "main",
                          endpoint=self.settings.hf_endpoint)

    def uri(self, path: str) -> str:
        return f"hf://{self.source.repo_id}@{self.commit or self.source.revision or 'main'}/{path}"

    def meta(self, path: str, required: bool = False):
        """The Hub's metadata for one file, or None where it has no such file (unless required)."""
        from huggingface_hub import get_hf_file_metadata

        def head():
            try:
                return get_hf_file_metadata(self.url(path), timeout=self.settings.connect_timeout_s
                                            + self.settings.read_timeout_s)
            except Exception as err:  # huggingface_hub's and its HTTP client's exceptions
                raise _error(self.uri(path), err) from err

        try:
            meta = retrying(f"fetch {self.uri(path)}", self.settings, head)
        except _NoSuchEntry:
            if required:
                raise NotFound(self.uri(path), "the Hub has no such file (named by the sharded index)") from None
            return None
        if self.commit is None and meta.commit_hash:
            self.commit = meta.commit_hash
        return meta

    def remote(self, path: str, name: str, meta) -> RemoteFile:
        from huggingface_hub.utils import build_hf_headers

        url, uri = self.url(path), self.uri(path)
        etag = (meta.etag or "").strip('"').lower() or None
        headers = build_hf_headers()  # the token goes to the Hub only: urllib3 drops it on the CDN redirect
        # At a pinned commit the bytes cannot change, so no If-Range (the CDN's own ETag differs anyway).
        return RemoteFile(uri=uri, name=name, size=meta.size, version=etag,
                          sha256=etag if etag and SHA256.fullmatch(etag) else None,
                          open=lambda offset: self.http.open(url, uri, offset, None, headers))

    def shards(self, index_path: str) -> list[str]:
        from huggingface_hub.utils import build_hf_headers

        raw = retrying(f"fetch {self.uri(index_path)}", self.settings,
                       lambda: self.http.get_small(self.url(index_path), self.uri(index_path), build_hf_headers()))
        try:
            shards = sorted(set(json.loads(raw)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise FetchError(self.uri(index_path), f"not a sharded checkpoint index: {err}") from None
        bad = [s for s in shards if ".." in PurePosixPath(s).parts or s.startswith("/")]
        if not shards or bad:
            raise FetchError(self.uri(index_path), f"the index names no usable shards: {bad or 'none'}")
        return shards

    def provenance(self) -> dict:
        return {"hf_repo": self.source.repo_id, "hf_revision": self.commit or self.source.revision or "main"}


class _NoSuchEntry(FetchError):
    """The repo is there but this file is not: a probe's normal answer, not a failure."""


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _error(uri: str, err: Exception) -> FetchError:
    from huggingface_hub import errors as he

    if isinstance(err, he.OfflineModeIsEnabled):
        return FetchError(uri, "HF_HUB_OFFLINE is set: the Hub may not be contacted")
    if isinstance(err, he.GatedRepoError):
        return AccessDenied(uri, "a gated repo: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(err, he.RepositoryNotFoundError):
        return NotFound(uri, "no such repository (or a private one: set HF_TOKEN)")
    if isinstance(err, he.RevisionNotFoundError):
        return NotFound(uri, "no such revision in the repository")
    if isinstance(err, he.EntryNotFoundError):
        return _NoSuchEntry(uri, "no such file in the repository")
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, he.HfHubHTTPError) and status is not None:
        if status in (401, 403):
            return AccessDenied(uri, f"the Hub answered {status} (set HF_TOKEN)")
        if status >= 500 or status in (408, 429):
            return Unreachable(uri, f"the Hub answered {status}")
        return FetchError(uri, f"the Hub answered {status}: {str(err).splitlines()[0]}")
    name = type(err).__name__
    if "Timeout" in name and "Connect" not in name:
        return Stalled(uri, f"stalled: no answer within the timeout ({name})")
    if "Connect" in name or "Timeout" in name or isinstance(err, OSError):
        return Unreachable(uri, f"unreachable: {name}: {str(err).splitlines()[0] if str(err) else ''}")
    return FetchError(uri, f"{name}: {err}")
