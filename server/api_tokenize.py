"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info.

lm-eval's remote tokenizer backend uses all three, so an evaluation needs no tokenizer of
its own: it counts, truncates and splits contexts with the server's.

    /tokenize      {"prompt": str} or {"messages": [...], "add_generation_prompt": bool}
                   -> {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize    {"tokens": [int]} -> {"prompt": str}
    /tokenizer_info -> the tokenizer's kind, vocabulary size, special tokens, context length
"""

from __future__ import annotations

from aiohttp import web

from . import keys
from .api_chat import chat_prompt
from .errors import BadRequest
from .middleware import read_json
from .protocol import read_bool, read_model, require_object
from .protocol_chat import read_messages
from .served import served_name

routes = web.RouteTableDef()


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    body = require_object(await read_json(request))
    served_name(request.app, read_model(body))
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise BadRequest("prompt", "give exactly one of prompt (a string) or messages")
    if body.get("messages") is not None:
        ids = (await chat_prompt(request.app, read_messages(body["messages"]),
                                 read_bool(body, "add_generation_prompt", True))).ids
    else:
        if not isinstance(body["prompt"], str):
            raise BadRequest("prompt", "must be a string")
        ids = (await request.app[keys.GENERATOR].prompt(body["prompt"], "prompt")).ids if body["prompt"] else []
    tokenizer = request.app[keys.LIFECYCLE].engine.tokenizer
    strs = [tokenizer.decode([t]) for t in ids] if read_bool(body, "return_token_strs", False) else None
    return web.json_response({"count": len(ids), "max_model_len": request.app[keys.LIFECYCLE].model.max_model_len,
                              "tokens": ids, "token_strs": strs})


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    body = require_object(await read_json(request))
    served_name(request.app, read_model(body))
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise BadRequest("tokens", "must be a list of token ids")
    tokenizer = request.app[keys.LIFECYCLE].engine.tokenizer
    bad = [t for t in tokens if not 0 <= t < tokenizer.n_vocab]
    if bad:
        raise BadRequest("tokens", f"token id {bad[0]} is out of range; this model has {tokenizer.n_vocab} tokens")
    return web.json_response({"prompt": tokenizer.decode(tokens)})


@routes.get("/tokenizer_info")
async def tokenizer_info(request: web.Request) -> web.Response:
    served_name(request.app, None)  # 503 while loading
    tokenizer = request.app[keys.LIFECYCLE].engine.tokenizer
    model = request.app[keys.LIFECYCLE].model
    eot = tokenizer.decode([tokenizer.eot_id]) if tokenizer.eot_id is not None else None
    return web.json_response({
        "tokenizer_class": {"gpt2": "GPT2Tokenizer", "char": "CharTokenizer"}.get(tokenizer.name, tokenizer.name),
        "name": tokenizer.name, "vocab_size": tokenizer.n_vocab, "model_max_length": model.max_model_len,
        "max_model_len": model.max_model_len, "bos_token": eot, "eos_token": eot, "pad_token": None,
        "eos_token_id": tokenizer.eot_id, "bos_token_id": tokenizer.eot_id, "add_bos_token": False,
        "chat_template": request.app[keys.CHAT_TEMPLATE].source,
    })
