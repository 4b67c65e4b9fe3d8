"""spec.server.chatTemplate and spec.server.servedModelName/modelAliases: how the OpenAI API names and prompts
the model. The server reads them as CHAT_TEMPLATE (a Jinja2 file) and SERVED_MODEL_NAME (comma-separated:
the first is reported, the rest are aliases), see server/config.py."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nanogpt_operator.errors import SpecError
from nanogpt_operator.fields import DNS_SUBDOMAIN, Fields

# ConfigMap keys: letters, digits, '-', '_', '.' (Kubernetes' IsConfigMapKey).
CONFIG_MAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
MODEL_NAME = re.compile(r"^[^,\s]+$")  # the server splits on commas


@dataclass(frozen=True)
class ChatTemplateRef:
    """A Jinja2 chat template in a ConfigMap key, mounted read-only."""

    config_map: str
    key: str = "chat_template.jinja"


def parse_chat_template(f: Fields | None) -> ChatTemplateRef | None:
    if f is None:
        return None
    ref = f.child("configMapKeyRef")
    if ref is None:
        raise SpecError(f.at("configMapKeyRef"), "is required: name the ConfigMap and key holding the template")
    key = ref.str("key", "chat_template.jinja", pattern=CONFIG_MAP_KEY)
    if key in (".", ".."):
        raise SpecError(ref.at("key"), f"must be a file name, got {key!r}")
    return ChatTemplateRef(config_map=ref.str("name", required=True, pattern=DNS_SUBDOMAIN), key=key)


def parse_served_names(f: Fields) -> tuple[str, ...]:
    """servedModelName first, then modelAliases; empty: the server names the model after its checkpoint."""
    name = f.str("servedModelName", pattern=MODEL_NAME)
    aliases = f.list("modelAliases")
    for i, alias in enumerate(aliases):
        if not isinstance(alias, str) or not MODEL_NAME.match(alias):
            raise SpecError(f"{f.at('modelAliases')}[{i}]", f"must be a name without commas or spaces, got {alias!r}")
    if aliases and name is None:
        raise SpecError(f.at("servedModelName"), "is required when modelAliases is set (it is the name reported)")
    names = ((name,) if name else ()) + tuple(aliases)
    if len(set(names)) != len(names):
        raise SpecError(f.at("modelAliases"), f"names must be distinct, got {', '.join(names)}")
    return names
