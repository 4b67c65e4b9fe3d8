"""The HTTP server: the seed's API and an OpenAI-compatible API over model.engine.

Names are imported lazily, so `python -m server --help` answers without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app", "serve", "ConfigError", "ServerConfig", "load_config"]

if TYPE_CHECKING:
    from .app import create_app, serve
    from .config import ConfigError, ServerConfig, load_config


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from . import app

        return getattr(app, name)
    if name in ("ConfigError", "ServerConfig", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
