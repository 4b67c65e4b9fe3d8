"""Middlewares, outermost first: access log + request id + HTTP metrics, errors, auth,
rate limits. Plus `read_json`, the one place request bodies are read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from aiohttp import web

from . import keys
from .auth import key_identity, presented_key
from .caller import caller_key
from .errors import InvalidBody, InvalidJSON, PayloadTooLarge, Unauthorized, UnsupportedMediaType, error_response, translate

log = logging.getLogger("server.access")

# Probes and docs never need a key; /metrics is open unless METRICS_AUTH.
OPEN_PATHS = {"/health", "/healthz", "/readyz", "/openapi.json"}
# Routes that generate: rate limited, counted in flight, refused while draining.
GENERATION_PATHS = {"/generate", "/batch_generate", "/v1/completions", "/v1/chat/completions"}
REQUEST_ID, ACCESS = keys.REQUEST_ID, keys.ACCESS
_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _route(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def access_middleware(request: web.Request, handler):
    """Request id (accepted or generated, echoed by `echo_request_id`), one JSON access line, HTTP metrics."""
    rid = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = rid if _ID_OK.match(rid) else uuid.uuid4().hex
    request[ACCESS] = {}
    start = time.perf_counter()
    status = 499  # client went away (handler cancelled) unless a response says otherwise
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        elapsed = time.perf_counter() - start
        route = _route(request)
        metrics = request.app[keys.METRICS]
        metrics.requests.labels(route=route, method=request.method, status=str(status)).inc()
        metrics.latency.labels(route=route).observe(elapsed)
        log.info("request", extra={
            "request_id": request[REQUEST_ID], "method": request.method, "path": request.path, "route": route,
            "status": status, "duration_s": round(elapsed, 6), "client": request.remote,
            "identity": request.get(keys.IDENTITY), **request[ACCESS],
        })


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: also covers streamed responses, whose headers go out before handlers return."""
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ConnectionResetError:
        # The client left mid-response: nobody to answer and no server error. aiohttp treats
        # CancelledError as exactly that (a premature disconnect), so hand it that.
        raise asyncio.CancelledError() from None
    except Exception as exc:  # noqa: BLE001 - every error becomes one JSON shape; nothing escapes as a bare 500
        err = translate(exc, request.app[keys.CONFIG].max_body_bytes)
        if err.status == 429:
            request.app[keys.METRICS].rate_limited.inc()
        return error_response(err)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    config = request.app[keys.CONFIG]
    store = request.app[keys.KEYS]
    path = request.path
    needs_key = store.enabled and path not in OPEN_PATHS and (path != "/metrics" or config.metrics_auth)
    key = presented_key(request)
    if needs_key:
        if not store.check(key):
            raise Unauthorized()
        request[keys.IDENTITY] = key_identity(key)
    else:
        request[keys.IDENTITY] = "addr:" + (request.remote or "unknown")
    return await handler(request)


@web.middleware
async def generation_middleware(request: web.Request, handler):
    """For generation routes: refuse while draining or loading, rate-limit, count in flight."""
    if request.path not in GENERATION_PATHS or request.method != "POST":
        return await handler(request)
    lifecycle = request.app[keys.LIFECYCLE]
    lifecycle.engine_or_raise()  # 503 Draining / NotReady before any work
    config = request.app[keys.CONFIG]
    request[keys.IDENTITY] = caller_key(request.headers, config.rate_limit_key, config.rate_limit_key_max_bytes,
                                        request[keys.IDENTITY])
    await request.app[keys.LIMITER].check_request(request[keys.IDENTITY])
    lifecycle.enter()
    try:
        return await handler(request)
    finally:
        lifecycle.exit()


def note_access(request: web.Request, prompts, completions=None) -> None:
    """Fields for this request's access-log line (prompts only with LOG_PROMPTS)."""
    access = request[ACCESS]
    access["prompt_tokens"] = sum(len(p.ids) for p in prompts)
    if completions is not None:
        access["completion_tokens"] = sum(c.completion_tokens for c in completions)
        access["cached"] = sum(c.cached for c in completions)
    if request.app[keys.CONFIG].log_prompts:
        access["prompts"] = [p.text for p in prompts]


async def read_json(request: web.Request) -> object:
    """The body as JSON: 415 unless application/json, 413 past MAX_BODY_BYTES, 400 if malformed."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(request.headers.get("Content-Type", ""))
    limit = request.app[keys.CONFIG].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(limit) from None
    except web.RequestPayloadError as e:  # a corrupt gzip/deflate body, a cut chunked body
        raise InvalidBody(str(e).splitlines()[-1].strip() or "the body could not be read") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJSON(f"malformed JSON body: not UTF-8 (byte {e.start})") from None
    max_depth = request.app[keys.CONFIG].max_json_depth
    if _nesting(text, max_depth) > max_depth:
        raise InvalidJSON(f"malformed JSON body: nested deeper than MAX_JSON_DEPTH={max_depth}")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError (with its position), NaN/Infinity, integers past 4300 digits
        reason = str(e).split("; use sys.set_int_max_str_digits", 1)[0]  # no advice meant for programmers
        raise InvalidJSON(f"malformed JSON body: {reason}") from None
    except RecursionError:
        raise InvalidJSON(f"malformed JSON body: nested too deeply for MAX_JSON_DEPTH={max_depth}") from None


def _nesting(text: str, limit: int) -> int:
    """The deepest [ / { nesting outside strings (stops counting past the limit)."""
    if text.count("[") + text.count("{") <= limit:
        return 0  # cannot nest deeper than it has brackets: the common case costs two counts
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRINGS.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > limit:
            break
    return deepest


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (RFC 8259 has no NaN or Infinity)")

