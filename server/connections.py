"""Connections under hostile clients: time limits on reading, caps on how many, and
protocol errors answered in our JSON shape without echoing the request.

aiohttp bounds none of this by itself (its keep-alive timer is the only clock, and its
parse-error page echoes the raw header line, API key included, into an ERROR
traceback). `GuardedHandler` is aiohttp's own `RequestHandler` with:

- HEADER_TIMEOUT: a request's head must be complete this long after its first byte
  (or after the connection opens); otherwise the connection is closed.
- BODY_TIMEOUT: a body must be complete this long after its head; otherwise the
  handler's read fails (408) and the connection closes. This also bounds how long a
  client that never finishes its body can hold the SIGTERM drain.
- KEEPALIVE_TIMEOUT: idle time between requests (aiohttp's own timer).
- MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT: connections past either cap are answered
  503 and closed at once, so the process never runs out of file descriptors (where
  asyncio would log an accept error per attempt and new clients would hang).
- protocol errors: a JSON 400, one redacted log line, counted in metrics.

`listen()` serves an AppRunner's server through it; `ConnectionGuard` holds the counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)
access_log = logging.getLogger("server.access")

# File descriptors kept free for everything that is not a client connection (model
# files, Redis, logs, the listening socket, the tokenizer pool).
FD_RESERVE = 64
LOG_INTERVAL_S = 10.0  # overload warnings: at most one line per interval


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 30.0
    max_connections: int = 1024
    max_per_client: int = 256

    @staticmethod
    def of(config) -> "ConnectionLimits":
        return ConnectionLimits(config.header_timeout, config.body_timeout, config.keepalive_timeout,
                                config.max_connections, config.max_connections_per_client)


class ThrottledLog:
    """One warning per interval for a repeated event, with how many happened since."""

    def __init__(self, logger: logging.Logger, message: str, interval: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self._logger, self._message, self._interval, self._clock = logger, message, interval, clock
        self._last = -interval
        self._count = 0

    def event(self, **fields) -> None:
        self._count += 1
        now = self._clock()
        if now - self._last >= self._interval:
            self._logger.warning(self._message, extra={"events": self._count, **fields})
            self._last, self._count = now, 0


class ConnectionGuard:
    """Open connections, in total and per client address; owned by `listen()`'s caller."""

    def __init__(self, limits: ConnectionLimits, metrics=None):
        self.limits = limits
        self.max_connections = effective_max_connections(limits.max_connections)
        self.metrics = metrics
        self.open = 0
        self.per_client: dict[str, int] = {}
        self.refused = 0
        self.handlers: set = set()  # GuardedHandlers of admitted connections
        self._refusal_log = ThrottledLog(log, "refusing connections over the limit")
        self.timeout_log = ThrottledLog(log, "closed connections that were too slow to send their request")
        self.protocol_log = ThrottledLog(log, "malformed HTTP requests")

    def admit(self, client: str) -> str | None:
        """None if the connection may proceed, else which limit it hit."""
        if self.open >= self.max_connections:
            return f"MAX_CONNECTIONS={self.max_connections}"
        if self.per_client.get(client, 0) >= self.limits.max_per_client:
            return f"MAX_CONNECTIONS_PER_CLIENT={self.limits.max_per_client}"
        self.open += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        left = self.per_client.get(client, 1) - 1
        if left:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)

    def cut_bodies(self, error: Exception) -> None:
        """SIGTERM: fail every body still arriving, so an upload that never ends cannot hold the drain."""
        for handler in list(self.handlers):
            handler.cut_body(error)

    def refuse(self, limit: str) -> None:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.rejected.labels(reason="connections").inc()
        self._refusal_log.event(limit=limit)


def effective_max_connections(wanted: int) -> int:
    """MAX_CONNECTIONS, lowered to what the file-descriptor limit allows."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    allowed = max(1, soft - FD_RESERVE)
    if wanted > allowed:
        log.warning("MAX_CONNECTIONS lowered to fit the file-descriptor limit",
                    extra={"max_connections": wanted, "rlimit_nofile": soft, "effective": allowed})
        return allowed
    return wanted


def _refusal(limit: str) -> bytes:
    body = json.dumps({"error": {"message": f"too many connections ({limit}); retry later", "type": "server_error",
                                 "param": None, "code": "overloaded"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


def _reason(exc: BaseException | None) -> str:
    """What was wrong with a malformed request, without the request's bytes (they may hold a key)."""
    text = (getattr(exc, "message", None) or str(exc or "")).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    for quote in ("b'", 'b"', "'", '"'):
        first = first.split(quote, 1)[0]
    return first.strip().rstrip(":").strip()[:120] or type(exc).__name__


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, with the limits above (one per connection)."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs):
        super().__init__(manager, keepalive_timeout=guard.limits.keepalive_timeout, **kwargs)
        self._guard = guard
        self._client = ""
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._body = None  # the payload still arriving, while BODY_TIMEOUT runs

    # ------------------------------------------------------------ admission

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, (tuple, list)) else str(peer)
        refused = self._guard.admit(self._client)
        if refused is not None:
            self._guard.refuse(refused)
            transport.write(_refusal(refused))  # type: ignore[attr-defined]
            transport.close()
            return
        self._admitted = True
        self._guard.handlers.add(self)
        super().connection_made(transport)
        self._arm(self._guard.limits.header_timeout, self._head_too_slow)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return  # refused in connection_made: aiohttp never saw it
        self._admitted = False
        self._disarm()
        self._guard.handlers.discard(self)
        self._guard.release(self._client)
        super().connection_lost(exc)

    # ------------------------------------------------------------ read deadlines

    def data_received(self, data: bytes) -> None:
        idle = not (self._request_in_progress or self._messages or self._body is not None)
        if idle and self._deadline is None:  # the first byte of a new request's head
            self._arm(self._guard.limits.header_timeout, self._head_too_slow)
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:  # a head is complete
            self._disarm()
            payload = self._messages[-1][1]
            if not payload.is_eof():
                self._body = payload
                self._arm(self._guard.limits.body_timeout, self._body_too_slow)
        elif self._body is not None and self._body.is_eof():
            self._body = None
            self._disarm()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self._request_in_progress or self._messages or self.transport is None:
            return
        limit = f"HEADER_TIMEOUT={self._guard.limits.header_timeout:g}s"
        self._guard.timeout_log.event(phase="headers", limit=limit)
        self.transport.write(_timeout_response(f"request head not complete within {limit}"))
        self.force_close()

    def _body_too_slow(self) -> None:
        self._deadline = None
        from .errors import RequestTimeout

        limit = f"BODY_TIMEOUT={self._guard.limits.body_timeout:g}s"
        self.cut_body(RequestTimeout(f"request body not complete within {limit}"), phase="body", limit=limit)

    def cut_body(self, error: Exception, **fields) -> None:
        """Fail the read of a body still arriving (a timeout, or the drain), then close after the answer."""
        body, self._body = self._body, None
        if body is None or body.is_eof():
            return
        self._disarm()
        if fields:
            self._guard.timeout_log.event(**fields)
        self._keepalive = False
        body.set_exception(error)

    # ------------------------------------------------------------ errors

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None):
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        reason = _reason(exc)
        self._guard.protocol_log.event(reason=reason, client=self._client)
        metrics = self._guard.metrics
        if metrics is not None:
            metrics.requests.labels(route="malformed", method="unknown", status=str(status)).inc()
        access_log.info("request", extra={"request_id": None, "method": None, "path": None, "route": "malformed",
                                          "status": status, "client": self._client, "error": reason})
        body = {"error": {"message": f"malformed HTTP request: {reason}", "type": "invalid_request_error",
                          "param": None, "code": "malformed_request"}}
        resp = web.json_response(body, status=status)
        resp.force_close()
        return resp

    def log_exception(self, *args, **kwargs) -> None:
        from .errors import ServerError

        exc = kwargs.get("exc_info")
        if isinstance(exc, (web.RequestPayloadError, ServerError)):
            # A body the client broke (corrupt gzip, timed out), already answered; aiohttp
            # meets it again while discarding the unread rest. Not a server error.
            log.debug("discarded an unreadable request body", extra={"error": _reason(exc)})
            return
        super().log_exception(*args, **kwargs)


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


async def listen(runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard) -> asyncio.AbstractServer:
    """Serve `runner`'s (set up) server on host:port through GuardedHandler. The caller closes
    the returned server before `runner.cleanup()` (this replaces web.TCPSite)."""
    loop = asyncio.get_running_loop()
    manager = runner.server
    throttle_accept_errors(loop)
    return await loop.create_server(lambda: GuardedHandler(manager, guard, loop=loop, access_log=None),
                                    host, port, reuse_address=True)


def throttle_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio reports every failed accept() (EMFILE) through the loop's exception handler;
    keep one line per interval."""
    throttled = ThrottledLog(log, "socket.accept() out of system resource")
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            throttled.event(error=str(context.get("exception")))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
