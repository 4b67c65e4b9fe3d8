"""fetch(URI, DEST): resolve the source into files, bring each into the cache (or find it there), place them.

    source text ──parse_source──> Source ──resolve──> [RemoteFile] ──_get_file──> blobs ──place──> DEST

A pinned digest (--sha256) already in the cache needs no network at all; otherwise the source is asked
for each file's version (one HEAD), and a version seen before is served from the cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cache import Cache, manifest_digest, ref_key
from .config import FetchSettings
from .errors import FetchError, StorageError, Unreachable, VerificationFailed
from .place import place_dir, place_file
from .transfer import Listing, RemoteFile, Status, download, retrying
from .uri import HfSource, HttpSource, LocalSource, RemoteSource, S3Source, Source, parse_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchedFile:
    name: str
    sha256: str
    size: int
    downloaded: int  # bytes received by this fetch (0: from the cache)
    blob: Path


@dataclass(frozen=True)
class FetchResult:
    uri: str
    path: Path
    sha256: str  # the file's digest, or a directory's manifest digest (cache.manifest_digest)
    is_dir: bool
    files: tuple[FetchedFile, ...]
    seconds: float
    name: str
    provenance: dict

    @property
    def cached(self) -> bool:
        return all(f.downloaded == 0 for f in self.files)

    def status(self) -> dict:
        """The machine-readable outcome (the last stdout line of `python -m model fetch`)."""
        return {"phase": "Fetched", "uri": self.uri, "path": str(self.path), "sha256": self.sha256,
                "directory": self.is_dir, "bytes": sum(f.size for f in self.files),
                "downloaded_bytes": sum(f.downloaded for f in self.files), "cached": self.cached,
                "seconds": round(self.seconds, 3), **({"provenance": self.provenance} if self.provenance else {}),
                "files": [{"name": f.name, "sha256": f.sha256, "bytes": f.size} for f in self.files]}


def fetch(text: str | Path, dest: str | Path | None, sha256: str | None = None,
          settings: FetchSettings | None = None, emit: Callable[[Status], None] | None = None) -> FetchResult:
    """Fetch the checkpoint `text` names to `dest` (None: a snapshot in the cache); see the module doc."""
    settings = settings or FetchSettings.from_env()
    source = parse_source(text, settings.allow_http)
    expect = _check_digest(source.display, sha256)
    t0 = time.monotonic()
    cache = Cache(settings.cache_dir)
    if isinstance(source, LocalSource):
        listing = _local_listing(source)
    else:
        listing = _pinned(cache, source, expect) or _resolve_or_last(cache, source, settings)
    single = expect if not listing.is_dir else None
    files = [_get_file(cache, f, single, settings, emit) for f in listing.files]
    if listing.is_dir:
        entries = [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in files]
        digest = cache.record_manifest(entries)
        if expect and digest != expect:
            raise VerificationFailed(source.display, f"sha256 mismatch: --sha256 says {expect}, the directory's "
                                                     f"manifest digest is {digest}")
    else:
        digest = files[0].sha256
    if not isinstance(source, LocalSource):
        cache.record_last(source.display, digest, listing.is_dir)
    name = getattr(source, "name", None) or Path(str(text)).name
    path = _destination(cache, dest, digest, files, listing.is_dir)
    if listing.is_dir:
        place_dir([(f.name, f.blob) for f in files], path, source.display)
    else:
        place_file(files[0].blob, path, source.display)
    result = FetchResult(source.display, path, digest, listing.is_dir, tuple(files), time.monotonic() - t0,
                         name, listing.provenance)
    log.info("fetched %s to %s: %d file(s), sha256 %s, %s", source.display, path, len(files), digest,
             "from the cache" if result.cached else f"{sum(f.downloaded for f in files)} bytes downloaded")
    return result


def resolve(source: RemoteSource, settings: FetchSettings) -> Listing:
    if isinstance(source, HttpSource):
        from .http import HttpClient

        client = HttpClient(settings)
        probe = retrying(f"fetch {source.display}", settings,
                         lambda: client.probe(source.url, source.display, _file_name(source)))
        return Listing([probe], False)
    if isinstance(source, S3Source):
        from .s3 import resolve_s3

        return resolve_s3(source, settings)
    if isinstance(source, HfSource):
        from .hf import resolve_hf

        return resolve_hf(source, settings)
    raise TypeError(f"not a remote source: {source!r}")


def _get_file(cache: Cache, remote: RemoteFile, expect: str | None, settings: FetchSettings,
              emit: Callable[[Status], None] | None) -> FetchedFile:
    if expect and remote.sha256 and expect != remote.sha256.lower():
        raise VerificationFailed(remote.uri, f"sha256 mismatch: --sha256 says {expect}, the source says "
                                             f"{remote.sha256.lower()} (nothing was downloaded)")
    hit = _cached(cache, remote, expect)
    if hit is not None:
        return hit
    key = ref_key(remote.uri, remote.version or "", remote.size)
    with cache.lock(key, remote.uri):
        hit = _cached(cache, remote, expect)  # another pod may have finished it while we waited
        if hit is not None:
            return hit
        partial = cache.partial(key)
        if remote.version is None and partial.exists():
            partial.unlink()  # no version: nothing says the bytes there belong to what the server has now
        digest, size, moved = download(remote, partial, settings, expect, emit)
        try:
            blob = cache.commit(partial, digest)
            cache.record(remote.uri, remote.version, remote.size, digest)
        except OSError as err:
            raise StorageError(remote.uri, f"cannot write into the cache {cache.root}: {err.strerror or err}") from err
    return FetchedFile(remote.name, digest, size, moved, blob)


def _cached(cache: Cache, remote: RemoteFile, expect: str | None) -> FetchedFile | None:
    digest = expect or (remote.sha256.lower() if remote.sha256 else None)
    if not cache.has_blob(digest):
        digest = cache.lookup(remote.uri, remote.version, remote.size)
        if digest is None or (expect and digest != expect):
            return None
    blob = cache.blob(digest)
    size = blob.stat().st_size
    if remote.size is not None and size != remote.size:
        return None
    cache.record(remote.uri, remote.version, remote.size, digest)
    log.info("fetch %s: in the cache (sha256 %s)", remote.uri, digest)
    return FetchedFile(remote.name, digest, size, 0, blob)


def _resolve_or_last(cache: Cache, source: RemoteSource, settings: FetchSettings) -> Listing:
    """The source's listing; when it cannot be reached, what it last gave, if that is still cached
    (as huggingface_hub falls back to its cache): a restart during an outage still serves."""
    try:
        return resolve(source, settings)
    except Unreachable as err:
        last = cache.last(source.display) if settings.offline_fallback and err.retryable else None
        listing = _pinned(cache, source, last["sha256"]) if last else None
        if listing is None:
            raise
        log.warning("fetch %s: %s; using the copy fetched before (sha256 %s, NANOGPT_FETCH_OFFLINE_FALLBACK)",
                    source.display, err.cause, last["sha256"])
        return Listing(listing.files, listing.is_dir, {"offline_fallback": err.reason})


def _pinned(cache: Cache, source: RemoteSource, expect: str | None) -> Listing | None:
    """A digest given and its content already cached: a listing that needs no request at all."""
    if not expect:
        return None

    def never(offset: int):
        raise AssertionError("a cached file is never opened")

    if cache.has_blob(expect):
        return Listing([RemoteFile(source.display, _file_name(source), None, None, expect, never)], False)
    files = cache.manifest(expect)
    if files:
        return Listing([RemoteFile(source.display, f["name"], f["size"], None, f["sha256"], never)
                        for f in files], True)
    return None


def _local_listing(source: LocalSource) -> Listing:
    """A local path fetched to DEST: copied through the cache like any other source (and verified)."""
    root = source.path
    if not root.exists():
        raise FetchError(str(root), "no such file or directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]

    def opener(p: Path):
        return lambda offset: _LocalBody(p, offset)

    files = [RemoteFile(str(p), p.relative_to(root).as_posix() if root.is_dir() else p.name, p.stat().st_size,
                        None, None, opener(p)) for p in paths]
    return Listing(files, root.is_dir())


class _LocalBody:
    def __init__(self, path: Path, offset: int):
        self.fh = open(path, "rb")
        self.fh.seek(offset)
        self.start, self.total = offset, path.stat().st_size

    def chunks(self):
        while chunk := self.fh.read(1 << 20):
            yield chunk

    def close(self) -> None:
        self.fh.close()


def _destination(cache: Cache, dest: str | Path | None, digest: str, files: list[FetchedFile], is_dir: bool) -> Path:
    if dest is None:
        snap = cache.snapshot_dir(digest)
        return snap if is_dir else snap / files[0].name
    dest = Path(dest)
    if not is_dir and (dest.is_dir() or str(dest).endswith("/")):
        return dest / files[0].name  # an existing folder: the file goes inside it, under its own name
    return dest


def _file_name(source: RemoteSource) -> str:
    if isinstance(source, HttpSource):
        from urllib.parse import unquote, urlsplit

        return Path(unquote(urlsplit(source.url).path)).name or "checkpoint"
    if isinstance(source, S3Source):
        return Path(source.key).name or "checkpoint"
    return Path(source.path).name or "checkpoint"


def _check_digest(uri: str, sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    hexdigest = sha256.strip().lower().removeprefix("sha256:")
    if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        from .errors import InvalidSource

        raise InvalidSource(uri, f"--sha256 must be 64 hex digits, got {sha256!r}")
    return hexdigest


__all__ = ["FetchResult", "FetchedFile", "Listing", "fetch", "resolve", "manifest_digest", "Source"]
