"""Request validation and response building for both APIs (no I/O, no engine).

Every check raises `BadRequest(field, message)` naming the field and its limit. Bools
are not accepted where numbers are expected (JSON `true` is not 1). Unknown fields are
ignored, as OpenAI's API does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from model.sampling import SamplingParams

from .errors import BadRequest, InvalidJSON, Unprocessable

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1

# The seed's /generate defaults.
SEED_DEFAULTS = {"max_length": 100, "temperature": 0.8, "top_k": 50, "top_p": 1.0}
# OpenAI's /v1/completions defaults.
OPENAI_DEFAULTS = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0}


@dataclass(frozen=True)
class Limits:
    max_length: int  # MAX_LENGTH_LIMIT
    max_prompts: int  # prompts per /batch_generate or /v1/completions request
    max_n: int = 1  # MAX_N: choices per prompt
    max_logprobs: int = 0  # MAX_LOGPROBS: top alternatives per token

    @staticmethod
    def of(config) -> "Limits":
        # Its own limit, not MAX_QUEUE: one request must not be able to fill the whole queue.
        return Limits(max_length=config.max_length_limit,
                      max_prompts=min(config.max_prompts_per_request, config.max_queue), max_n=config.max_n,
                      max_logprobs=config.max_logprobs)


# ------------------------------------------------------------------ field readers

def _missing(body: dict, field: str) -> bool:
    return body.get(field) is None


def read_int(body: dict, field: str, default: int | None, lo: int, hi: int, name: str | None = None) -> int | None:
    name = name or field
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, f"must be an integer between {lo} and {hi}")
    if not lo <= value <= hi:
        raise BadRequest(name, f"must be between {lo} and {hi}, got {value}")
    return value


def read_number(body: dict, field: str, default: float, lo: float, hi: float, name: str | None = None,
                lo_open: bool = False) -> float:
    name = name or field
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(name, f"must be a number between {lo} and {hi}")
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise BadRequest(name, f"must be {bound} and <= {hi}, got {value}")
    return float(value)


def read_bool(body: dict, field: str, default: bool, name: str | None = None) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(name or field, "must be true or false")
    return value


def read_stop(body: dict, field: str = "stop", name: str | None = None) -> tuple[str, ...]:
    name = name or field
    value = body.get(field)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_STOP:
        raise BadRequest(name, f"must be a string or a list of at most {MAX_STOP} strings")
    for s in value:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            raise BadRequest(name, f"each stop sequence must be a non-empty string of at most {MAX_STOP_CHARS} characters")
    return tuple(value)


def read_prompt(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(name, "must be a string")
    if not value:
        raise BadRequest(name, "must not be empty")
    return value


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise InvalidJSON("request body must be a JSON object")
    return body


def _params(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
            stop: tuple[str, ...], logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    try:
        params.validate()
    except ValueError as e:  # the engine's own limits, stricter than ours
        raise BadRequest(None, str(e)) from None
    return params


# ------------------------------------------------------------------ the seed's API

@dataclass(frozen=True)
class SeedRequest:
    prompts: list[str]
    params: SamplingParams
    stream: bool


def seed_params(body: dict, limits: Limits, prefix: str = "") -> SamplingParams:
    d = SEED_DEFAULTS
    return _params(
        max_new_tokens=read_int(body, "max_length", d["max_length"], 1, limits.max_length, prefix + "max_length"),
        temperature=read_number(body, "temperature", d["temperature"], 0.0, 2.0, prefix + "temperature"),
        top_k=read_int(body, "top_k", d["top_k"], 0, 1_000_000, prefix + "top_k"),
        top_p=read_number(body, "top_p", d["top_p"], 0.0, 1.0, prefix + "top_p", lo_open=True),
        seed=read_int(body, "seed", None, 0, MAX_SEED, prefix + "seed"),
        stop=read_stop(body, "stop", prefix + "stop"),
    )


def parse_generate(body: Any, limits: Limits) -> SeedRequest:
    body = require_object(body)
    if _missing(body, "prompt"):
        raise BadRequest("prompt", "is required")
    prompt = read_prompt(body["prompt"], "prompt")
    return SeedRequest([prompt], seed_params(body, limits), read_bool(body, "stream", False))


def parse_batch(body: Any, limits: Limits) -> SeedRequest:
    body = require_object(body)
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("prompts", f"must be a non-empty list of at most {limits.max_prompts} strings")
    if len(prompts) > limits.max_prompts:
        raise BadRequest("prompts", f"at most {limits.max_prompts} prompts per request, got {len(prompts)}")
    prompts = [read_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    params = body.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest("params", "must be an object")
    return SeedRequest(prompts, seed_params(params, limits, "params."), False)


def seed_result(prompt: str, text: str, tokens_generated: int) -> dict:
    """The seed's response object: generated_text starts with the prompt."""
    return {"prompt": prompt, "generated_text": prompt + text, "tokens_generated": tokens_generated}


# ------------------------------------------------------------------ OpenAI's API

@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]  # text, or token ids
    params: SamplingParams  # max_new_tokens >= 1 even for max_tokens 0 (see echo_only)
    stream: bool
    include_usage: bool
    echo: bool
    n: int = 1
    echo_only: bool = False  # max_tokens 0 with echo: the prompt (and its logprobs), nothing generated


def _openai_prompts(value: Any, limits: Limits) -> list[str | list[int]]:
    def ids(v: Any, name: str) -> list[int]:
        if not v or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
            raise BadRequest(name, "token id lists must be non-empty lists of non-negative integers")
        return list(v)

    if isinstance(value, str):
        return [read_prompt(value, "prompt")]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [ids(value, "prompt")]
        if len(value) > limits.max_prompts:
            raise BadRequest("prompt", f"at most {limits.max_prompts} prompts per request, got {len(value)}")
        out: list[str | list[int]] = []
        for i, v in enumerate(value):
            out.append(ids(v, f"prompt[{i}]") if isinstance(v, list) else read_prompt(v, f"prompt[{i}]"))
        return out
    raise BadRequest("prompt", "must be a string, a list of strings, or a list of token ids")


def read_model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model", "must be a string")
    return model


def read_n(body: dict, limits: Limits, n_prompts: int) -> int:
    """`n` choices per prompt; `best_of` only where it changes nothing (= n)."""
    n = read_int(body, "n", 1, 1, limits.max_n)
    best_of = read_int(body, "best_of", None, 1, limits.max_n)
    if best_of is not None and best_of != n:
        raise Unprocessable("best_of", f"only best_of equal to n ({n}) is supported")
    if n * n_prompts > limits.max_prompts:
        raise BadRequest("n", f"n x prompts may be at most {limits.max_prompts} (MAX_PROMPTS_PER_REQUEST), got {n * n_prompts}")
    return n


def reject_unsupported(body: dict) -> None:
    """Fields we parse but cannot honour: 422 unless they have their neutral value."""
    for field in ("presence_penalty", "frequency_penalty"):
        if read_number(body, field, 0.0, -2.0, 2.0) != 0.0:
            raise Unprocessable(field, "only 0 is supported")
    if body.get("logit_bias") not in (None, {}):
        raise Unprocessable("logit_bias", "logit_bias is not supported")


def read_stream(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    stream = read_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options", "must be an object")
    return stream, read_bool(options or {}, "include_usage", False, "stream_options.include_usage")


def parse_completion(body: Any, limits: Limits) -> CompletionRequest:
    body = require_object(body)
    if _missing(body, "prompt"):
        raise BadRequest("prompt", "is required")
    model = read_model(body)
    prompts = _openai_prompts(body["prompt"], limits)
    n = read_n(body, limits, len(prompts))
    logprobs = read_int(body, "logprobs", None, 0, limits.max_logprobs)
    reject_unsupported(body)
    if body.get("suffix") not in (None, ""):
        raise Unprocessable("suffix", "suffix is not supported")
    stream, include_usage = read_stream(body)
    echo = read_bool(body, "echo", False)
    d = OPENAI_DEFAULTS
    max_tokens = read_int(body, "max_tokens", d["max_tokens"], 0 if echo else 1, limits.max_length)
    params = _params(
        max_new_tokens=max(1, max_tokens),  # the engine generates at least one; echo_only drops it
        temperature=read_number(body, "temperature", d["temperature"], 0.0, 2.0),
        top_k=read_int(body, "top_k", 0, 0, 1_000_000),  # vLLM's extension; 0 = off
        top_p=read_number(body, "top_p", d["top_p"], 0.0, 1.0, lo_open=True),
        seed=read_int(body, "seed", None, 0, MAX_SEED),
        stop=read_stop(body),
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo and logprobs is not None else None,
    )
    return CompletionRequest(model, prompts, params, stream, include_usage, echo, n, echo_only=max_tokens == 0)


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The params of n independent samples. A seeded request's first sample keeps its seed (so n=1
    is the single request) and the others get seeds derived from it: the same choices every time."""
    if params.seed is None:
        return [params] * n  # the engine draws a seed for each
    out = [params]
    for j in range(1, n):
        digest = hashlib.sha256(f"{params.seed}:{j}".encode()).digest()
        out.append(dataclasses.replace(params, seed=int.from_bytes(digest[:8], "big") & MAX_SEED))
    return out


def openai_finish_reason(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, "stop")


def completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def completion_response(cid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_chunk(cid: str, model: str, created: int, choices: list[dict], usage: dict | None = None) -> dict:
    out = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def models_response(names: tuple[str, ...], created: int, root: str, max_model_len: int) -> dict:
    """One card per served name (aliases too), with the fields vLLM's clients read."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "nanogpt-k8s", "root": root,
         "parent": None, "max_model_len": max_model_len, "permission": []} for name in names]}
