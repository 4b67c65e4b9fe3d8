"""POST /v1/chat/completions (JSON or SSE): messages -> the chat template -> a completion."""

from __future__ import annotations

import dataclasses
import time

from aiohttp import web

from . import keys, protocol, protocol_chat, sse
from .middleware import ACCESS, note_access, read_json
from .protocol_logprobs import chat_logprobs
from .served import served_name
from .serving import Prompt

routes = web.RouteTableDef()


async def chat_prompt(app: web.Application, messages: list[dict], add_generation_prompt: bool = True) -> Prompt:
    """The messages rendered by the app's chat template and tokenized (BadRequest names `messages`)."""
    tokenizer = app[keys.LIFECYCLE].engine_or_raise().tokenizer
    special = tokenizer.decode([tokenizer.eot_id]) if tokenizer.eot_id is not None else ""
    text = app[keys.CHAT_TEMPLATE].render(messages, add_generation_prompt, special)
    return await app[keys.GENERATOR].prompt(text, "messages")


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app[keys.CONFIG]
    req = protocol_chat.parse_chat(await read_json(request), protocol.Limits.of(config))
    name = served_name(app, req.model)
    prompt = await chat_prompt(app, req.messages)
    room = app[keys.LIFECYCLE].model.max_model_len - len(prompt.ids)  # < 1: the engine's PromptTooLong
    stop = tuple(dict.fromkeys(req.params.stop + app[keys.CHAT_TEMPLATE].stop))
    params = dataclasses.replace(req.params, stop=stop,
                                 max_new_tokens=req.max_tokens or max(1, min(config.max_length_limit, room)))
    if req.stream:
        return await _stream(request, name, prompt, params, req.include_usage)
    completions = await app[keys.GENERATOR].complete([prompt] * req.n, protocol.choice_params(params, req.n),
                                                     request[keys.IDENTITY])
    note_access(request, [prompt], completions)
    tokenizer = app[keys.LIFECYCLE].engine.tokenizer
    choices = []
    for i, c in enumerate(completions):
        logprobs = None
        if req.top_logprobs is not None:
            logprobs = chat_logprobs(tokenizer, c.logprobs, req.top_logprobs,
                                     len(c.text) if c.finish_reason == "stop" else None)
        choices.append(protocol_chat.chat_choice(i, c.text, protocol.openai_finish_reason(c.finish_reason),
                                                 logprobs))
    return web.json_response(protocol_chat.chat_response(
        protocol_chat.chat_id(), name, choices, len(prompt.ids), sum(c.completion_tokens for c in completions)))


async def _stream(request: web.Request, name: str, prompt: Prompt, params, include_usage: bool):
    gen = request.app[keys.GENERATOR]
    cid, created = protocol_chat.chat_id(), int(time.time())
    note_access(request, [prompt])

    async def deltas():
        yield protocol_chat.chat_chunk(cid, name, created, {"role": "assistant", "content": ""})
        async for text in stream:
            yield protocol_chat.chat_chunk(cid, name, created, {"content": text})

    async with gen.stream(prompt, params, request[keys.IDENTITY]) as stream:
        response = await sse.open_stream(request)
        if await sse.pump(response, deltas(), request.app[keys.CONFIG].request_timeout):
            c = stream.completion
            request[ACCESS]["completion_tokens"] = c.completion_tokens
            await sse.send(response, protocol_chat.chat_chunk(cid, name, created, {},
                                                              protocol.openai_finish_reason(c.finish_reason)))
            if include_usage:
                await sse.send(response, protocol_chat.chat_chunk(
                    cid, name, created, None, usage_=protocol_chat.usage(len(prompt.ids), c.completion_tokens)))
        await sse.done(response)
    return response
