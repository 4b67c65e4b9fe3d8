"""The checkpoint cache: verified files stored once by their sha256, and the records that say which
URI version holds which digest. A cache directory may be shared by pods (a ReadWriteMany PVC): every
write is a rename of a finished file, and one download of a file runs at a time (an flock).

    CACHE/blobs/sha256/<hex>            a verified file, read-only, named by its content
    CACHE/refs/<key>.json               {"uri", "version", "size", "sha256"}: this URI at this version is that blob
    CACHE/refs/last-<sha256(uri)>.json  what the URI gave last (used only while the source is unreachable)
    CACHE/manifests/<hex>.json          a directory source: {"files": [{"name", "sha256", "size"}]}, named by
                                        the sha256 of its canonical JSON (what `fetch` reports as the digest)
    CACHE/partial/<key>                 a download in progress (kept to resume; never loaded)
    CACHE/locks/<key>.lock              held while one process downloads <key>
    CACHE/snapshots/<hex12>/...         what load_model_from_checkpoint(URI) loads: hard links to blobs,
                                        laid out as the source was (ckpt.pt, or config.json + weights)

<key> is the sha256 of "<uri>\\n<version>\\n<size>": a new ETag is a new key, the old blob stays until
removed. Anything here may be deleted while no fetch runs; it is fetched again when next needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def ref_key(uri: str, version: str, size: int | None) -> str:
    return hashlib.sha256(f"{uri}\n{version}\n{size}".encode()).hexdigest()


def manifest_digest(files: list[dict]) -> str:
    canonical = json.dumps(sorted(files, key=lambda f: f["name"]), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def blob(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256.lower()

    def has_blob(self, sha256: str | None) -> bool:
        return bool(sha256) and self.blob(sha256).is_file()

    def partial(self, key: str) -> Path:
        return self._dir("partial") / key

    def lookup(self, uri: str, version: str | None, size: int | None) -> str | None:
        """The digest recorded for this URI at this version, when its blob is still here."""
        if not version:
            return None  # without a version nothing says the bytes are the ones we stored
        ref = self.root / "refs" / f"{ref_key(uri, version, size)}.json"
        try:
            digest = json.loads(ref.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return digest if self.has_blob(digest) else None

    def record(self, uri: str, version: str | None, size: int | None, sha256: str) -> None:
        if version:
            self._write_json(self._dir("refs") / f"{ref_key(uri, version, size)}.json",
                             {"uri": uri, "version": version, "size": size, "sha256": sha256})

    def commit(self, partial: Path, sha256: str) -> Path:
        """Move a verified download into blobs/ (atomically; an identical blob already there wins)."""
        dst = self.blob(sha256)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(partial, 0o444)  # shared by hard links: nobody may write into it in place
        os.replace(partial, dst)
        return dst

    def manifest(self, digest: str) -> list[dict] | None:
        try:
            files = json.loads((self.root / "manifests" / f"{digest.lower()}.json").read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return files if all(self.has_blob(f.get("sha256")) for f in files) else None

    def record_manifest(self, files: list[dict]) -> str:
        digest = manifest_digest(files)
        self._write_json(self._dir("manifests") / f"{digest}.json", {"files": files})
        return digest

    def record_last(self, uri: str, sha256: str, is_dir: bool) -> None:
        """What this URI gave last, for a fetch while the source is unreachable."""
        key = hashlib.sha256(uri.encode()).hexdigest()
        self._write_json(self._dir("refs") / f"last-{key}.json",
                         {"uri": uri, "sha256": sha256, "directory": is_dir, "at": time.time()})

    def last(self, uri: str) -> dict | None:
        path = self.root / "refs" / f"last-{hashlib.sha256(uri.encode()).hexdigest()}.json"
        try:
            last = json.loads(path.read_text())
            return last if last.get("uri") == uri and isinstance(last.get("sha256"), str) else None
        except (OSError, ValueError, AttributeError):
            return None

    def snapshot_dir(self, digest: str) -> Path:
        return self._dir("snapshots") / digest[:12]

    @contextlib.contextmanager
    def lock(self, key: str, what: str, poll_s: float = 0.2, log_every_s: float = 30.0) -> Iterator[None]:
        """One download of `key` at a time, across processes and pods; the kernel frees the lock when
        its holder dies, so a killed fetch never blocks the next."""
        path = self._dir("locks") / f"{key}.lock"
        with open(path, "a+") as fh:
            waited_since, logged = time.monotonic(), 0.0
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - waited_since
                    if waited - logged >= log_every_s or not logged:
                        log.info("fetch %s: waiting for another process fetching it into %s", what, self.root)
                        logged = max(waited, 1e-9)
                    time.sleep(poll_s)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    @staticmethod
    def _write_json(path: Path, obj: dict) -> None:
        # A unique temporary name (O_EXCL), not one made of the pid: pods sharing the cache on a PVC each
        # have their own pid namespace, so two fetches there often have the same pid.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(obj, sort_keys=True))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
