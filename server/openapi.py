"""GET /openapi.json: an OpenAPI 3.0 description of every route, with the configured
limits as schema bounds (schemathesis fuzzes the server from it in the tests)."""

from __future__ import annotations

from aiohttp import web

from . import keys
from .config import ServerConfig
from .protocol import MAX_SEED, MAX_STOP, MAX_STOP_CHARS

routes = web.RouteTableDef()


def _error() -> dict:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True}}}}}


def _sampling(config: ServerConfig, length_field: str) -> dict:
    stop = {"oneOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                      {"type": "array", "maxItems": MAX_STOP,
                       "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}}],
            "nullable": True}
    return {
        length_field: {"type": "integer", "minimum": 1, "maximum": config.max_length_limit},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_k": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED, "nullable": True},
        "stop": stop,
    }


def _choices(config: ServerConfig) -> dict:
    return {"n": {"type": "integer", "minimum": 1, "maximum": config.max_n},
            "best_of": {"type": "integer", "minimum": 1, "maximum": config.max_n,
                        "description": "accepted only equal to n"}}


def _stream() -> dict:
    return {"type": "boolean", "description": "server-sent events; every choice (n, several prompts) streams, "
            "each chunk naming its index and carrying the logprobs of its own text when asked"}


def _stream_options() -> dict:
    return {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}


def _json_body(schema_ref: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": schema_ref}}}}


def _responses(ok_ref: str | None, *codes: int, stream: bool = False) -> dict:
    ok: dict = {"description": "OK"}
    content = {}
    if ok_ref:
        content["application/json"] = {"schema": {"$ref": ok_ref}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    if content:
        ok["content"] = content
    out = {"200": ok}
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for code in codes:
        out[str(code)] = {"description": {400: "invalid request", 401: "missing or invalid API key",
                                          404: "unknown model", 413: "body too large", 415: "not JSON",
                                          422: "unsupported value", 429: "rate limited",
                                          503: "loading, draining or overloaded (Retry-After)"}[code], **err}
    return out


def build_openapi(config: ServerConfig) -> dict:
    gen_errors = (400, 401, 413, 415, 422, 429, 503)
    seed_result = {"type": "object", "required": ["prompt", "generated_text", "tokens_generated"],
                   "properties": {"prompt": {"type": "string"}, "generated_text": {"type": "string"},
                                  "tokens_generated": {"type": "integer"}}}
    prompt = {"type": "string", "minLength": 1, "maxLength": 2000}
    schemas = {
        "Error": _error(),
        "GenerateRequest": {"type": "object", "required": ["prompt"], "properties": {
            "prompt": prompt, **_sampling(config, "max_length"), "stream": {"type": "boolean"}}},
        "GenerateResponse": seed_result,
        "BatchRequest": {"type": "object", "required": ["prompts"], "properties": {
            "prompts": {"type": "array", "minItems": 1, "maxItems": config.max_queue, "items": prompt},
            "params": {"type": "object", "properties": _sampling(config, "max_length")}}},
        "BatchResponse": {"type": "object", "required": ["results"],
                          "properties": {"results": {"type": "array", "items": seed_result}}},
        "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": {
            "model": {"type": "string"},
            "prompt": {"oneOf": [prompt, {"type": "array", "minItems": 1, "maxItems": config.max_queue,
                                          "items": prompt}]},
            **_sampling(config, "max_tokens"),
            **_choices(config),
            "logprobs": {"type": "integer", "minimum": 0, "maximum": config.max_logprobs, "nullable": True,
                         "description": "top alternatives per token; log-softmax of the raw logits"},
            "stream": _stream(), "echo": {"type": "boolean"}, "user": {"type": "string"},
            "stream_options": _stream_options()}},
        "ChatRequest": {"type": "object", "required": ["messages"], "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
                "type": "object", "required": ["role", "content"], "properties": {
                    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                    "content": {"oneOf": [prompt, {"type": "array", "items": {
                        "type": "object", "required": ["type", "text"],
                        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": prompt}}}]},
                    "name": {"type": "string"}}}},
            **_sampling(config, "max_tokens"),
            "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": config.max_length_limit},
            **_choices(config),
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": config.max_logprobs},
            "stream": _stream(), "stream_options": _stream_options(), "user": {"type": "string"}}},
        "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                           "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                          "created": {"type": "integer"}, "model": {"type": "string"},
                                          "choices": {"type": "array", "items": {"type": "object"}},
                                          "usage": {"type": "object"}}},
        "TokenizeRequest": {"type": "object", "properties": {
            "model": {"type": "string"}, "prompt": {"type": "string", "maxLength": 2000},
            "add_special_tokens": {"type": "boolean"}, "return_token_strs": {"type": "boolean"}}},
        "TokenizeResponse": {"type": "object", "required": ["count", "max_model_len", "tokens"], "properties": {
            "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
            "token_strs": {"type": "array", "items": {"type": "string"}, "nullable": True}}},
        "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
            "model": {"type": "string"},
            "tokens": {"type": "array", "maxItems": 2000, "items": {"type": "integer", "minimum": 0}}}},
        "DetokenizeResponse": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                      "created": {"type": "integer"}, "model": {"type": "string"},
                                      "choices": {"type": "array", "items": {"type": "object"}},
                                      "usage": {"type": "object"}}},
        "Models": {"type": "object", "required": ["object", "data"],
                   "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {"type": "object"}}}},
    }
    security = [{"ApiKey": []}, {"Bearer": []}] if config.auth_enabled else []

    def op(summary: str, responses: dict, body: str | None = None, secured: bool = True) -> dict:
        out: dict = {"summary": summary, "responses": responses}
        if body:
            out["requestBody"] = _json_body(body)
        out["security"] = security if secured else []
        return out

    probe = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
             "503": {"description": "not alive / not ready"}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "nanogpt-k8s server", "version": "0.1.0"},
        "paths": {
            "/generate": {"post": op("Generate text (the seed's API)",
                                     _responses("#/components/schemas/GenerateResponse", *gen_errors, stream=True),
                                     "#/components/schemas/GenerateRequest")},
            "/batch_generate": {"post": op("Generate for several prompts together",
                                           _responses("#/components/schemas/BatchResponse", *gen_errors),
                                           "#/components/schemas/BatchRequest")},
            "/v1/completions": {"post": op("OpenAI-compatible completions",
                                           _responses("#/components/schemas/Completion", 404, *gen_errors,
                                                      stream=True),
                                           "#/components/schemas/CompletionRequest")},
            "/v1/chat/completions": {"post": op("OpenAI-compatible chat completions (through the chat template)",
                                                _responses("#/components/schemas/ChatCompletion", 404, *gen_errors,
                                                           stream=True),
                                                "#/components/schemas/ChatRequest")},
            "/v1/models": {"get": op("The served model, one card per served name",
                                     _responses("#/components/schemas/Models", 401, 503))},
            "/tokenize": {"post": op("Token ids of a prompt or of chat messages (vLLM's shape)",
                                     _responses("#/components/schemas/TokenizeResponse", 400, 401, 404, 413, 415, 503),
                                     "#/components/schemas/TokenizeRequest")},
            "/detokenize": {"post": op("Text of token ids (vLLM's shape)",
                                       _responses("#/components/schemas/DetokenizeResponse", 400, 401, 404, 413, 415,
                                                  503),
                                       "#/components/schemas/DetokenizeRequest")},
            "/tokenizer_info": {"get": op("The tokenizer's kind, special tokens and chat template",
                                          _responses(None, 401, 503))},
            "/health": {"get": op("Health, device and model", probe, secured=False)},
            "/healthz": {"get": op("Liveness probe", probe, secured=False)},
            "/readyz": {"get": op("Readiness probe", probe, secured=False)},
            "/metrics": {"get": op("Prometheus metrics",
                                   {"200": {"description": "text exposition",
                                            "content": {"text/plain": {"schema": {"type": "string"}}}}},
                                   secured=config.metrics_auth)},
        },
        "components": {"schemas": schemas, "securitySchemes": {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer"}}},
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(build_openapi(request.app[keys.CONFIG]))
