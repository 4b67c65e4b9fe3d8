"""Why a fetch failed, as types: each names the URI and the cause, and carries the word and exit code
that `python -m model fetch` reports, so that an operator can tell a typo from a flaky network.

    FetchError                 base: .uri, .cause, .reason, .exit_code, .retryable
    ├── InvalidSource          the text is not a source we can fetch (scheme, syntax, http:// not allowed)  2
    ├── NotFound               404, NoSuchKey/NoSuchBucket, a Hub repo, revision or file that is not there  3
    ├── AccessDenied           401/403, a gated or private Hub repo without a token                          4
    ├── Unreachable            DNS, refused or reset connections, TLS, 5xx/429 after every retry         5
    │   ├── Stalled            no byte arrived within the read timeout, after every retry                 5
    │   └── TLSError           the certificate did not verify (not retried)                              5
    ├── VerificationFailed     the bytes are not the ones promised (sha256 or size)                       6
    └── StorageError           the destination or the cache cannot hold the file (no space, read-only)    7
"""

from __future__ import annotations


class FetchError(Exception):
    """A checkpoint could not be fetched; str() is '<uri>: <cause>'."""

    reason = "FetchFailed"
    exit_code = 1
    retryable = False  # whether trying again later may succeed without anyone changing anything

    def __init__(self, uri: str, cause: str):
        super().__init__(uri, cause)
        self.uri, self.cause = uri, cause

    def __str__(self) -> str:
        return f"{self.uri}: {self.cause}"


class InvalidSource(FetchError, ValueError):
    """The text names no source we can fetch; ValueError too, so config parsers report it as a bad value."""

    reason, exit_code = "InvalidURI", 2


class NotFound(FetchError):
    """The server answered that the object does not exist."""

    reason, exit_code = "NotFound", 3


class AccessDenied(FetchError):
    """The server refused the credentials we sent (or the lack of them)."""

    reason, exit_code = "Forbidden", 4


class Unreachable(FetchError):
    """The server could not be reached or kept failing; retried with backoff before this was raised."""

    reason, exit_code, retryable = "Unreachable", 5, True


class Stalled(Unreachable):
    """The connection stayed open but sent nothing for longer than the read timeout."""

    reason = "Stalled"


class TLSError(Unreachable):
    """The TLS handshake failed (an untrusted or mismatched certificate); retrying will not help."""

    reason, retryable = "TLSError", False


class VerificationFailed(FetchError):
    """The downloaded bytes differ from the digest or size promised; they have been removed."""

    reason, exit_code = "DigestMismatch", 6


class StorageError(FetchError):
    """Writing the file failed on our side: no space, a read-only or missing directory."""

    reason, exit_code = "StorageError", 7
