"""Every error the server answers with, and the one middleware that turns them into HTTP.

    ServerError (500 server_error)
    ├── BadRequest (400 invalid_request_error; names .field and the limit)
    │   ├── InvalidJSON (400), InvalidBody (400: corrupt gzip/deflate)
    │   ├── PromptTooLong (400 context_length_exceeded; token count and limit)
    │   └── Unprocessable (422)
    ├── Unauthorized (401 authentication_error)
    ├── NotFound (404), MethodNotAllowed (405)
    ├── RequestTimeout (408), PayloadTooLarge (413), UnsupportedMediaType (415)
    ├── RateLimited (429 rate_limit_exceeded; Retry-After)
    ├── Unavailable (503; Retry-After): Overloaded (queue full), NotReady (loading), Draining (SIGTERM)
    └── GenerationTimeout (504)

Handlers raise these; `error_middleware` is the only place that builds an error
response, in OpenAI's shape {"error": {"message", "type", "param", "code"}}, on every
route, including aiohttp's own 404/405/413 and any unexpected exception.
"""

from __future__ import annotations

import logging
import math

from aiohttp import web

log = logging.getLogger(__name__)


class ServerError(Exception):
    """Base class: an HTTP status, an OpenAI error type and code, the offending field."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str = "internal server error", *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ServerError):
    """A field is missing, of the wrong type or out of range; `param` names it."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"

    def __init__(self, field: str | None, message: str, *, code: str | None = None):
        super().__init__(f"{field}: {message}" if field else message, param=field, code=code)
        self.field = field


class InvalidJSON(BadRequest):
    """The body is not JSON, or not a JSON object."""

    code = "invalid_json"

    def __init__(self, message: str = "request body must be a JSON object"):
        super().__init__(None, message)


class InvalidBody(BadRequest):
    """The body could not be read as sent: a corrupt Content-Encoding, a broken chunked body."""

    code = "invalid_body"

    def __init__(self, reason: str):
        super().__init__(None, f"request body could not be read: {reason}")


class PromptTooLong(BadRequest):
    """The prompt has more tokens than the model's context allows."""

    code = "context_length_exceeded"

    def __init__(self, field: str, n_tokens: int, limit: int):
        super().__init__(field, f"prompt is {n_tokens} tokens; this model accepts at most {limit}")
        self.n_tokens, self.limit = n_tokens, limit


class Unprocessable(BadRequest):
    """Well-formed but unsupported (e.g. n > 1)."""

    status = 422
    code = "unsupported_value"


class Unauthorized(ServerError):
    """No API key, or one that is not accepted."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "missing or invalid API key (send X-API-Key or Authorization: Bearer)"):
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="nanogpt"'}


class NotFound(ServerError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(ServerError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"

    def __init__(self, message: str, allowed: frozenset[str] | set[str] = frozenset()):
        super().__init__(message)
        self.allowed = sorted(allowed)

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}  # RFC 9110 15.5.6: a 405 must carry Allow


class PayloadTooLarge(ServerError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"

    def __init__(self, limit: int):
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


class RequestTimeout(ServerError):
    """The client did not finish sending its request within HEADER_TIMEOUT / BODY_TIMEOUT."""

    status, type, code = 408, "invalid_request_error", "request_timeout"


class UnsupportedMediaType(ServerError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"

    def __init__(self, got: str):
        super().__init__(f"Content-Type must be application/json, got {got or 'none'!r}")


class _RetryLater(ServerError):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class RateLimited(_RetryLater):
    """Too many requests or generated tokens for this key in the current window."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class Unavailable(_RetryLater):
    """The server cannot take this request now; try again after Retry-After."""

    status, type, code = 503, "server_error", "unavailable"


class Overloaded(Unavailable):
    """The engine's queue is full."""

    code = "overloaded"


class NotReady(Unavailable):
    """The model is still loading or warming up."""

    code = "not_ready"


class Draining(Unavailable):
    """The server is shutting down (SIGTERM) and takes no new requests."""

    code = "draining"


class GenerationTimeout(ServerError):
    """The generation took longer than REQUEST_TIMEOUT and was cancelled."""

    status, type, code = 504, "server_error", "timeout"


# aiohttp raises its own HTTPExceptions for routing and body size; give them our shape.
_HTTP_MAP = {
    404: lambda e: NotFound("no route for this path"),
    405: lambda e: MethodNotAllowed(f"method {e.method} not allowed on this path; allowed: "
                                    f"{', '.join(sorted(e.allowed_methods))}", e.allowed_methods),
}


def error_body(err: ServerError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: ServerError) -> web.Response:
    return web.json_response(error_body(err), status=err.status, headers=err.headers())


def translate(exc: BaseException, max_body_bytes: int) -> ServerError:
    """Any exception -> the ServerError to answer with."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(max_body_bytes)
    if isinstance(exc, web.HTTPException):
        make = _HTTP_MAP.get(exc.status)
        if make:
            return make(exc)
        err = ServerError(exc.reason or "error")
        err.status, err.type, err.code = exc.status, "invalid_request_error", None
        return err
    log.exception("unhandled error", exc_info=exc)
    return ServerError()
