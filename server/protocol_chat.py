"""/v1/chat/completions: request validation and response building (no I/O, no engine).

Messages are checked here (role, content) and rendered by server/chat_template.py. Content
is a string or a list of text parts ({"type": "text", "text": ...}), as OpenAI's clients
send it; anything else (images, audio, tool calls) is a 400 naming the message.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from model.sampling import SamplingParams

from .errors import BadRequest, Unprocessable
from .protocol import (MAX_SEED, Limits, _params, read_bool, read_int, read_model, read_n, read_number, read_stop,
                       read_stream, reject_unsupported, require_object, usage)

ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 1024


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: list[dict]  # {"role", "content": str[, "name"]}, validated
    params: SamplingParams  # max_new_tokens is a placeholder when max_tokens is None
    max_tokens: int | None  # None: what the context leaves, up to MAX_LENGTH_LIMIT
    stream: bool
    include_usage: bool
    n: int
    top_logprobs: int | None  # None: no logprobs


def _content(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{field}[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(field, "must be a string or a list of text parts")


def read_messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages", "must be a non-empty list of {role, content} objects")
    if len(value) > MAX_MESSAGES:
        raise BadRequest("messages", f"at most {MAX_MESSAGES} messages, got {len(value)}")
    out = []
    for i, m in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(field, "must be an object with role and content")
        role = m.get("role")
        if role is None:
            raise BadRequest(f"{field}.role", "is required")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise BadRequest(f"{field}.role", "tool and function messages are not supported (no tool calling)")
        if role not in ROLES:
            raise BadRequest(f"{field}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if m.get("content") is None:
            raise BadRequest(f"{field}.content", "is required")
        msg = {"role": role, "content": _content(m["content"], f"{field}.content")}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise BadRequest(f"{field}.name", "must be a string")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _reject_tools(body: dict) -> None:
    for field in ("tools", "functions"):
        if body.get(field):
            raise BadRequest(field, "tool calling is not supported by this server")
    if body.get("tool_choice") not in (None, "none"):
        raise BadRequest("tool_choice", "tool calling is not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise Unprocessable("response_format", "only {\"type\": \"text\"} is supported")


def parse_chat(body: Any, limits: Limits) -> ChatRequest:
    body = require_object(body)
    if body.get("messages") is None:
        raise BadRequest("messages", "is required")
    messages = read_messages(body["messages"])
    _reject_tools(body)
    reject_unsupported(body)
    n = read_n(body, limits, 1)
    max_tokens = read_int(body, "max_completion_tokens", None, 1, limits.max_length)
    if max_tokens is None:
        max_tokens = read_int(body, "max_tokens", None, 1, limits.max_length)
    top = read_int(body, "top_logprobs", None, 0, limits.max_logprobs)
    logprobs = read_bool(body, "logprobs", False)
    if top is not None and not logprobs:
        raise BadRequest("top_logprobs", "needs logprobs: true")
    top_logprobs = (top or 0) if logprobs else None
    stream, include_usage = read_stream(body)
    params = _params(
        max_new_tokens=max_tokens or 1,
        temperature=read_number(body, "temperature", 1.0, 0.0, 2.0),
        top_k=read_int(body, "top_k", 0, 0, 1_000_000),
        top_p=read_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=read_int(body, "seed", None, 0, MAX_SEED),
        stop=read_stop(body),
        logprobs=top_logprobs,
    )
    return ChatRequest(read_model(body), messages, params, max_tokens, stream, include_usage, n, top_logprobs)


def chat_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_response(cid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
               usage_: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict:
    """One SSE event of choice `index`; delta None gives an empty choices list (the final usage event)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
