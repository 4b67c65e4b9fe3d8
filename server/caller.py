"""Who a generation request counts against: RATE_LIMIT, TOKEN_BUDGET and MAX_ROWS_PER_CALLER are kept
per caller. By default the caller is the API key (hashed), or the client address without keys. Behind a
gateway every request comes from the gateway's address, so RATE_LIMIT_KEY can name a header the gateway
sets per tenant instead: `fairness` is the Gateway API Inference Extension's flow-control header, the
same id its endpoint picker queues fairly by. The value is trusted only because the setting says so;
it is hashed (like a key) so that neither logs nor Redis keys carry what a client sent.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .auth import key_bytes
from .errors import BadRequest

if TYPE_CHECKING:  # aiohttp's header type; multidict comes with aiohttp, the server extra names aiohttp
    from multidict import MultiMapping


def header_identity(value: str) -> str:
    return "hdr:" + hashlib.sha256(key_bytes(value)).hexdigest()[:16]


def caller_key(headers: MultiMapping[str], header: str | None, max_bytes: int, fallback: str) -> str:
    """The bucket a request counts in: `header`'s value when set and present, else `fallback` (the key's
    identity or the client address). A value past `max_bytes`, or the header sent twice (a client's copy
    beside the gateway's), is a 400 rather than a guess."""
    if header is None:
        return fallback
    values = [v.strip() for v in headers.getall(header, []) if v.strip()]
    if not values:
        return fallback
    if len(values) > 1:
        raise BadRequest(header, f"sent {len(values)} times; RATE_LIMIT_KEY needs exactly one value",
                         code="invalid_header")
    size = len(key_bytes(values[0]))
    if size > max_bytes:
        raise BadRequest(header, f"{size} bytes, longer than RATE_LIMIT_KEY_MAX_BYTES={max_bytes}",
                         code="invalid_header")
    return header_identity(values[0])
