"""Which model names this server answers to (SERVED_MODEL_NAME, as vLLM's --served-model-name):
the first is the one reported; the rest are aliases clients may send as `model`."""

from __future__ import annotations

from aiohttp import web

from . import keys
from .errors import NotFound


def served_name(app: web.Application, requested: str | None) -> str:
    """The name to answer with: `requested` if it is one of ours (None: the primary); else 404.
    503 while the model loads (its name is not known before)."""
    lifecycle = app[keys.LIFECYCLE]
    lifecycle.engine_or_raise()
    names = lifecycle.model.names
    if requested is None:
        return names[0]
    if requested not in names:
        raise NotFound(f"model {requested!r} is not served here; this server serves {', '.join(map(repr, names))}",
                       param="model", code="model_not_found")
    return requested
