"""https:// (and, when allowed, http://) through urllib3: a HEAD (or a one-byte GET where HEAD is
refused, as pre-signed URLs do) for the size and version, then ranged GETs.

urllib3 because its read timeout applies to every socket read, so a server that stops sending in the
middle of a body raises instead of hanging; its own retries are off (transfer.retrying owns them), it
follows redirects, and it drops Authorization when a redirect leaves the host (the Hub's CDN).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

import urllib3
from urllib3.exceptions import (HTTPError, MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError,
                                ReadTimeoutError, SSLError, ConnectTimeoutError)

from .config import FetchSettings
from .errors import AccessDenied, FetchError, NotFound, Stalled, TLSError, Unreachable
from .transfer import RemoteFile

RETRYABLE_STATUS = (408, 425, 429, 500, 502, 503, 504)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_TOTAL_ONLY = re.compile(r"bytes\s+\*/(\d+)")


@dataclass
class HttpBody:
    response: urllib3.BaseHTTPResponse
    uri: str
    start: int
    total: int | None
    settings: FetchSettings

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from self.response.stream(self.settings.chunk_bytes, decode_content=False)
        except (HTTPError, OSError) as err:
            raise _network_error(self.uri, err, self.settings) from err

    def close(self) -> None:
        self.response.release_conn()
        self.response.close()


class _Empty:
    """A 416 for a range starting exactly at the end: the partial file is already whole."""

    def __init__(self, offset: int):
        self.start = self.total = offset

    def chunks(self) -> Iterator[bytes]:
        return iter(())

    def close(self) -> None:
        pass


@dataclass
class HttpClient:
    settings: FetchSettings
    pool: urllib3.PoolManager = field(init=False)

    def __post_init__(self) -> None:
        retries = urllib3.Retry(total=10, connect=0, read=0, status=0, other=0, redirect=10,
                                raise_on_redirect=True, raise_on_status=False)
        timeout = urllib3.Timeout(connect=self.settings.connect_timeout_s, read=self.settings.read_timeout_s)
        tls = {"ca_certs": str(self.settings.ca_bundle)} if self.settings.ca_bundle else {}
        self.pool = urllib3.PoolManager(retries=retries, timeout=timeout, **tls)

    def probe(self, url: str, uri: str, name: str, headers: dict | None = None,
              if_range: bool = True) -> RemoteFile:
        """What the server says about the file: size and version, without its body."""
        r = self._request("HEAD", url, uri, headers, preload=True)
        if r.status in (403, 405, 501):  # HEAD refused (pre-signed GET URLs): ask for the first byte instead
            r = self._request("GET", url, uri, {**(headers or {}), "Range": "bytes=0-0"}, preload=True)
        _raise_for_status(r, uri)
        size = _total(r)
        version = _version(r.headers)
        return RemoteFile(uri=uri, name=name, size=size, version=version, sha256=None,
                          open=lambda offset: self.open(url, uri, offset, version if if_range else None, headers))

    def open(self, url: str, uri: str, offset: int, version: str | None, headers: dict | None = None):
        h = dict(headers or {})
        if offset:
            h["Range"] = f"bytes={offset}-"
            if version:
                h["If-Range"] = version  # changed since? then the server sends it all (200), never a mix
        r = self._request("GET", url, uri, h, preload=False)
        if r.status == 416 and offset:
            m = _TOTAL_ONLY.match(r.headers.get("Content-Range", ""))
            r.release_conn()
            if m and int(m.group(1)) == offset:
                return _Empty(offset)
            return self.open(url, uri, 0, version, headers)
        if r.status >= 300:
            r.release_conn()
        _raise_for_status(r, uri)
        start = 0
        if r.status == 206:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if not m:
                r.release_conn()
                raise Unreachable(uri, f"206 without a usable Content-Range: {r.headers.get('Content-Range')!r}")
            start = int(m.group(1))
        return HttpBody(r, uri, start, _total(r), self.settings)

    def get_small(self, url: str, uri: str, headers: dict | None, limit: int = 16 << 20) -> bytes:
        """A whole small file (a sharded checkpoint's index) in memory."""
        r = self._request("GET", url, uri, headers, preload=False)
        try:
            _raise_for_status(r, uri)
            data = r.read(limit + 1, decode_content=True)
        except (HTTPError, OSError) as err:
            raise _network_error(uri, err, self.settings) from err
        finally:
            r.release_conn()
        if len(data) > limit:
            raise FetchError(uri, f"larger than {limit} bytes, too large for an index file")
        return data

    def _request(self, method: str, url: str, uri: str, headers: dict | None, preload: bool = False):
        h = urllib3.HTTPHeaderDict({"Accept-Encoding": "identity", "User-Agent": "nanogpt-k8s-fetch"})
        for k, v in (headers or {}).items():
            h[k] = v  # case-insensitive: huggingface_hub's user-agent replaces ours
        try:
            return self.pool.request(method, url, headers=h, preload_content=preload, redirect=True)
        except (HTTPError, OSError) as err:
            raise _network_error(uri, err, self.settings) from err


def _raise_for_status(r, uri: str) -> None:
    s = r.status
    if s < 300:
        return
    what = f"the server answered {s} {r.reason or ''}".rstrip()
    if s in (404, 410):
        raise NotFound(uri, what)
    if s in (401, 403):
        raise AccessDenied(uri, what + " (missing or wrong credentials, or an expired pre-signed URL)")
    if s in RETRYABLE_STATUS:
        raise Unreachable(uri, what)
    raise FetchError(uri, what)


def _network_error(uri: str, err: Exception, settings: FetchSettings) -> FetchError:
    reason = err.reason if isinstance(err, MaxRetryError) and err.reason is not None else err
    if isinstance(reason, ReadTimeoutError) or isinstance(getattr(reason, "__context__", None), ReadTimeoutError):
        return Stalled(uri, f"stalled: no data for {settings.read_timeout_s:g} s "
                            "(the read timeout, NANOGPT_FETCH_READ_TIMEOUT)")
    if isinstance(reason, SSLError):
        return TLSError(uri, f"TLS failed: {reason}")
    if isinstance(reason, NameResolutionError):
        return Unreachable(uri, f"unreachable: cannot resolve the host name ({_first_line(reason)})")
    if isinstance(reason, NewConnectionError):  # before ConnectTimeoutError: urllib3 derives it from that
        return Unreachable(uri, f"unreachable: {_first_line(reason)}")
    if isinstance(reason, ConnectTimeoutError):
        return Unreachable(uri, "unreachable: the connection timed out (NANOGPT_FETCH_CONNECT_TIMEOUT)")
    if isinstance(reason, ProtocolError):
        return Unreachable(uri, f"the connection dropped: {_first_line(reason)}")
    return Unreachable(uri, f"{type(reason).__name__}: {_first_line(reason)}")


def _first_line(err: Exception) -> str:
    text = str(err)
    # urllib3 prefixes its messages with the connection object's repr; keep the cause.
    text = re.sub(r"^<[^>]*>:\s*", "", text)
    text = re.sub(r"^HTTP(S)?Connection\([^)]*\):\s*", "", text)
    return (text.splitlines() or [""])[0][:200]


def _total(r) -> int | None:
    cr = r.headers.get("Content-Range")
    if cr:
        m = _CONTENT_RANGE.match(cr)
        if m and m.group(3) != "*":
            return int(m.group(3))
        return None
    length = r.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _version(headers) -> str | None:
    """A strong ETag, else Last-Modified: both identify one version of the bytes (If-Range accepts
    either); a weak ETag promises only equivalence, not the same bytes, so it is not used."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")
