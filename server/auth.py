"""API keys: `API_KEY` (one) and/or `API_KEYS_FILE` (one per line, '#' comments).

The file is re-read when its content changes (compared by digest), so a rotated Kubernetes Secret
takes effect without a restart; a file that vanishes or fails to read keeps the last
good keys. Keys are compared with `hmac.compare_digest` against every accepted key (no
early exit), and are never logged: callers get an opaque `identity` (a hash prefix) to
key rate limits and logs on.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from aiohttp import web

log = logging.getLogger(__name__)


def key_identity(key: str) -> str:
    """A stable, non-reversible name for a key (rate-limit buckets, access logs)."""
    return "key:" + hashlib.sha256(key_bytes(key)).hexdigest()[:16]


def key_bytes(key: str) -> bytes:
    """aiohttp decodes header bytes that are not UTF-8 as lone surrogates; give them back as
    the bytes the client sent, so such a key is simply wrong (401), never an encoding error."""
    return key.encode("utf-8", "surrogateescape")


def presented_key(request: web.Request) -> str | None:
    """The key a client sent: X-API-Key (the seed's header) or Authorization: Bearer."""
    key = request.headers.get("X-API-Key")
    if key:
        return key.strip()
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


class KeyStore:
    def __init__(self, api_key: str | None, keys_file: str | None):
        self._static = [api_key.encode()] if api_key else []
        self._path = Path(keys_file) if keys_file else None
        self._file_keys: list[bytes] = []
        self._digest: bytes | None = None  # sha256 of the file as last loaded
        self.reload_if_changed()

    @property
    def enabled(self) -> bool:
        return bool(self._static or self._path)

    def reload_if_changed(self) -> None:
        # By content, not by mtime and size: a rotated file of the same length written within
        # the filesystem's timestamp granularity would otherwise keep the old keys. The file
        # is small and in the page cache; reading it costs about as much as the stat did.
        if self._path is None:
            return
        try:
            raw = self._path.read_bytes()
        except OSError as e:
            if self._digest is not None:
                log.warning("cannot read API_KEYS_FILE; keeping the previous keys",
                            extra={"path": str(self._path), "error": type(e).__name__})
                self._digest = None
            return
        digest = hashlib.sha256(raw).digest()
        if digest == self._digest:
            return
        lines = raw.decode("utf-8", "surrogateescape").splitlines()
        self._file_keys = [key_bytes(ln.strip()) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        self._digest = digest
        log.info("loaded API keys", extra={"path": str(self._path), "n_keys": len(self._file_keys)})

    def check(self, key: str | None) -> bool:
        """True if `key` is accepted; constant time in the key's content."""
        self.reload_if_changed()
        if key is None:
            return False
        given = key_bytes(key)
        ok = False
        for accepted in self._static + self._file_keys:
            ok |= hmac.compare_digest(given, accepted)  # no short-circuit: every key is compared
        return ok
