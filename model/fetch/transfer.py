"""Moving one file's bytes: resume from a partial file, retry with backoff, log progress, verify.

Every backend (http.py, s3.py, hf.py) describes a file as a `RemoteFile` whose `open(offset)` returns a
`Body`: the bytes from `offset` on (or from 0, when the server ignored the range). This module owns
the loop around it, so that resuming, stalls, retries and the digest check behave the same for all.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, TypeVar

from .config import FetchSettings
from .errors import FetchError, StorageError, Unreachable, VerificationFailed

log = logging.getLogger(__name__)
T = TypeVar("T")


class Body(Protocol):
    start: int  # the offset of the first byte the body carries
    total: int | None  # the whole file's size, when the server said

    def chunks(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RemoteFile:
    uri: str  # as shown in logs and errors (a pre-signed URL's query left out)
    name: str  # the path below the destination: "ckpt.pt", "config.json", "shards/model-00001.safetensors"
    size: int | None
    version: str | None  # what names this content at this URI: a strong ETag, Last-Modified, the Hub's etag
    sha256: str | None  # the digest the source vouches for (the Hub's LFS etag, S3's full-object checksum)
    open: Callable[[int], Body]


@dataclass(frozen=True)
class Listing:
    """What a source turned out to hold."""

    files: list[RemoteFile]
    is_dir: bool
    provenance: dict = field(default_factory=dict)  # e.g. the Hub commit a branch pointed at


@dataclass
class Status:
    """Where a transfer stands, for the log line and the machine-readable status."""

    uri: str
    name: str
    done: int
    total: int | None
    rate_bps: float
    eta_s: float | None

    def as_dict(self) -> dict:
        return {"phase": "Fetching", "uri": self.uri, "file": self.name, "bytes_done": self.done,
                "bytes_total": self.total, "rate_bps": round(self.rate_bps),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1)}


class Progress:
    """Logs bytes, rate and ETA at most every `interval` seconds (and once at the end)."""

    def __init__(self, remote: RemoteFile, start: int, interval: float,
                 emit: Callable[[Status], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.remote, self.start, self.interval, self.emit, self.clock = remote, start, interval, emit, clock
        self.t0 = self.last = clock()
        self.total = remote.size

    def update(self, done: int, final: bool = False) -> None:
        now = self.clock()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = (done - self.start) / elapsed
        eta = (self.total - done) / rate if self.total is not None and rate > 0 else None
        status = Status(self.remote.uri, self.remote.name, done, self.total, rate, eta)
        log.info("fetch %s: %s%s, %s/s%s", self.remote.uri, _size(done),
                 f" of {_size(self.total)} ({100 * done / max(self.total, 1):.0f}%)" if self.total is not None else "",
                 _size(rate), f", ETA {eta:.0f} s" if eta is not None and not final else "")
        if self.emit is not None:
            self.emit(status)


def retrying(what: str, settings: FetchSettings, attempt: Callable[[], T],
             progressed: Callable[[], bool] = lambda: False) -> T:
    """Run `attempt` until it succeeds, a non-retryable FetchError, or `settings.retries` failures in a
    row; an attempt that moved bytes forward (`progressed`) starts the count again."""
    failures = 0
    while True:
        try:
            return attempt()
        except FetchError as err:
            failures = 1 if progressed() else failures + 1
            if not err.retryable or failures > settings.retries:
                if err.retryable and settings.retries:
                    err.cause += f" (gave up after {settings.retries} retries)"
                raise
            delay = min(settings.backoff_max_s, settings.backoff_s * 2 ** (failures - 1))
            delay *= random.uniform(0.5, 1.0)  # jitter: replicas that failed together retry apart
            log.warning("%s: %s; retry %d of %d in %.1f s", what, err.cause, failures, settings.retries, delay)
            time.sleep(delay)


def download(remote: RemoteFile, partial: Path, settings: FetchSettings, expect_sha256: str | None,
             emit: Callable[[Status], None] | None = None) -> tuple[str, int, int]:
    """Bring `remote` to `partial` (resuming whatever is there) and verify it.

    Returns (sha256, size, bytes transferred now). On a digest or size mismatch the partial file is
    removed and VerificationFailed raised; on any other failure it stays, for the next try to resume.
    """
    state = _Partial(partial)
    progress = Progress(remote, state.size, settings.progress_interval_s, emit)
    if state.size:
        log.info("fetch %s: resuming at %s", remote.uri, _size(state.size))
    moved = {"attempt_start": state.size}

    def attempt() -> None:
        moved["attempt_start"] = state.size
        _one_attempt(remote, state, settings, progress)

    try:
        retrying(f"fetch {remote.uri}", settings, attempt, progressed=lambda: state.size > moved["attempt_start"])
    except StorageError:
        state.close()
        partial.unlink(missing_ok=True)  # it will not fit: keeping it would only take the space
        raise
    finally:
        state.close()
        if state.size == 0:
            partial.unlink(missing_ok=True)  # nothing to resume from
    progress.update(state.size, final=True)
    digest = state.hexdigest()
    _verify(remote, partial, digest, state.size, expect_sha256)
    return digest, state.size, state.written


def _one_attempt(remote: RemoteFile, state: "_Partial", settings: FetchSettings, progress: Progress) -> None:
    body = remote.open(state.size)
    try:
        if body.start != state.size:
            if body.start != 0:
                raise Unreachable(remote.uri, f"asked for bytes from {state.size}, got them from {body.start}")
            if state.size:
                log.warning("fetch %s: the server sent the whole file again; starting over", remote.uri)
            state.restart()
        total = body.total if body.total is not None else remote.size
        progress.total = total
        _check_room(remote, state, total, settings)
        for chunk in body.chunks():
            state.write(chunk, remote)
            if settings.max_bytes and state.size > settings.max_bytes:
                raise StorageError(remote.uri, f"larger than NANOGPT_FETCH_MAX_BYTES={settings.max_bytes}")
            progress.update(state.size)
        if total is not None and state.size < total:
            raise Unreachable(remote.uri, f"the connection closed after {_size(state.size)} of {_size(total)}")
    finally:
        body.close()


def _check_room(remote: RemoteFile, state: "_Partial", total: int | None, settings: FetchSettings) -> None:
    if total is None:
        return
    if settings.max_bytes and total > settings.max_bytes:
        raise StorageError(remote.uri, f"{_size(total)} is larger than NANOGPT_FETCH_MAX_BYTES={settings.max_bytes}")
    free = shutil.disk_usage(state.path.parent).free
    if total - state.size > free:
        raise StorageError(remote.uri, f"needs {_size(total - state.size)} more, {state.path.parent} has "
                                       f"{_size(free)} free")


def _verify(remote: RemoteFile, partial: Path, digest: str, size: int, expect: str | None) -> None:
    problem = None
    if remote.size is not None and size != remote.size:
        problem = f"size mismatch: expected {remote.size} bytes, got {size}"
    for promised, by in ((expect, "--sha256"), (remote.sha256, "the source")):
        if problem is None and promised and promised.lower() != digest:
            problem = f"sha256 mismatch: {by} says {promised.lower()}, the bytes hash to {digest}"
    if problem is not None:
        partial.unlink(missing_ok=True)
        err = VerificationFailed(remote.uri, problem + "; the download was removed")
        if problem.startswith("size"):
            err.reason = "SizeMismatch"
        raise err


class _Partial:
    """The file being written, and the running sha256 of everything in it."""

    def __init__(self, path: Path):
        self.path = path
        self.written = 0  # bytes this process received
        self.hasher = hashlib.sha256()
        try:
            self.fh = open(path, "ab")
            with open(path, "rb") as fh:  # resuming: the digest must cover the bytes already there
                while chunk := fh.read(1 << 20):
                    self.hasher.update(chunk)
        except OSError as err:
            raise _storage_error(str(path), err) from err
        self.size = self.fh.tell()

    def write(self, chunk: bytes, remote: RemoteFile) -> None:
        try:
            self.fh.write(chunk)
        except OSError as err:
            self.close()
            if err.errno == errno.ENOSPC:  # an emptyDir over its sizeLimit gets the pod evicted: free it now
                self.path.unlink(missing_ok=True)
            raise _storage_error(remote.uri, err) from err
        self.hasher.update(chunk)
        self.size += len(chunk)
        self.written += len(chunk)

    def restart(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.hasher, self.size = hashlib.sha256(), 0

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


def _storage_error(where: str, err: OSError) -> StorageError:
    return StorageError(where, f"cannot write {err.filename or 'the file'}: {err.strerror or err}")


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
