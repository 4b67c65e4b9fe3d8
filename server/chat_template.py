"""Chat templates: a list of messages -> one prompt string, as Hugging Face and vLLM do it.

GPT-2 and nanoGPT models have no chat template of their own, so the default is a plain
transcript that a base model continues naturally:

    <system content>\\n\\n            (each system or developer message, as is)
    User: <content>\\n\\n
    Assistant: <content>\\n\\n
    Assistant:                       (the generation prompt)

and generation also stops where the model starts the next user turn (DEFAULT_STOP). A
Jinja2 template file (CHAT_TEMPLATE; the operator's spec.server.chatTemplate) replaces
it: it is rendered in Jinja2's immutable sandbox with the variables Hugging Face's
`apply_chat_template` passes (`messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, `raise_exception`), so templates written for HF models work unchanged.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import ConfigError
from .errors import BadRequest

DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ m.content }}\n\n"
    "{% else %}{{ m.role | capitalize }}: {{ m.content }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_STOP = ("\nUser:",)  # the default template's next user turn


class TemplateError(Exception):
    """Raised by a template's `raise_exception(...)` call: the messages do not fit it."""


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    """A compiled template and the stop strings it implies; built once per app (keys.CHAT)."""

    def __init__(self, source: str, origin: str, stop: tuple[str, ...] = ()):
        self.source, self.origin, self.stop = source, origin, stop
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError("CHAT_TEMPLATE", f"{origin}: line {e.lineno}: {e.message}") from None

    @staticmethod
    def load(path: str | None) -> "ChatTemplate":
        """The template in `path` (None: the default); ConfigError names CHAT_TEMPLATE if it is unusable."""
        if path is None:
            return ChatTemplate(DEFAULT_TEMPLATE, "default", DEFAULT_STOP)
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("CHAT_TEMPLATE", f"cannot read {path}: {e}") from None
        return ChatTemplate(source, path)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, special_token: str = "") -> str:
        """The prompt for `messages` (already validated); BadRequest("messages") if the template refuses them.
        special_token: the tokenizer's end-of-text, GPT-2's bos and eos both ("" for none)."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=special_token, eos_token=special_token,
                                         raise_exception=_raise)
        except TemplateError as e:
            raise BadRequest("messages", f"the chat template refused them: {e}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise BadRequest("messages", f"the chat template failed on them: {type(e).__name__}: {e}") from None


def _environment() -> ImmutableSandboxedEnvironment:
    # HF's settings: trim_blocks/lstrip_blocks, so templates written for it render the same here.
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
