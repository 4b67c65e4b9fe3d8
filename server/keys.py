"""Every `AppKey` the server uses, in one place (aiohttp's "no singletons" pattern)."""

from __future__ import annotations

from aiohttp import web

from .auth import KeyStore
from .cache import ResponseCache
from .chat_template import ChatTemplate
from .config import ServerConfig
from .lifecycle import Lifecycle
from .metrics import Metrics
from .ratelimit import RateLimiter
from .serving import Generator

CONFIG = web.AppKey("config", ServerConfig)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS = web.AppKey("metrics", Metrics)
KEYS = web.AppKey("keys", KeyStore)
LIMITER = web.AppKey("limiter", RateLimiter)
CACHE = web.AppKey("cache", ResponseCache)
GENERATOR = web.AppKey("generator", Generator)
CHAT_TEMPLATE = web.AppKey("chat_template", ChatTemplate)

# Per request.
IDENTITY = web.RequestKey("identity", str)  # hashed API key or RATE_LIMIT_KEY header, or client address
REQUEST_ID = web.RequestKey("request_id", str)  # X-Request-ID, accepted or generated
ACCESS = web.RequestKey("access", dict)  # fields handlers add to the access-log line
