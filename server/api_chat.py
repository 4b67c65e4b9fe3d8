"""POST /v1/chat/completions (JSON or SSE): messages -> the chat template -> a completion."""

from __future__ import annotations

import dataclasses
import time

from aiohttp import web

from . import keys, protocol, protocol_chat
from .middleware import note_access, read_json
from .protocol_logprobs import LogprobCursor, chat_logprobs, chat_shape
from .served import served_name
from .serving import Prompt
from .sse_choices import stream_choices

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
        return await _stream(request, name, prompt, params, req)
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


async def _stream(request: web.Request, name: str, prompt: Prompt, params, req) -> web.StreamResponse:
    gen = request.app[keys.GENERATOR]
    note_access(request, [prompt])
    async with gen.streams([prompt] * req.n, protocol.choice_params(params, req.n), request[keys.IDENTITY]) as streams:
        events = _ChatEvents(name, len(prompt.ids), req.top_logprobs, request.app[keys.LIFECYCLE].engine.tokenizer,
                             req.n)
        return await stream_choices(request, streams, events, req.include_usage)


class _ChatEvents:
    """Chat chunks (server/sse_choices.ChoiceEvents): the role first, then content deltas, each
    with the logprobs of the tokens its text starts (LogprobCursor) when asked."""

    def __init__(self, name: str, prompt_tokens: int, top_logprobs: int | None, tokenizer, n: int):
        self.cid, self.name, self.created = protocol_chat.chat_id(), name, int(time.time())
        self.prompt_tokens, self.top, self.tokenizer = prompt_tokens, top_logprobs, tokenizer
        self.cursors = [LogprobCursor(tokenizer) if top_logprobs is not None else None for _ in range(n)]
        self.sent = [0] * n

    def opening(self, index: int) -> dict:
        return self._chunk(index, {"role": "assistant", "content": ""}, None, None, logprobs=False)

    def delta(self, index: int, chunk) -> dict | None:
        if self.cursors[index] is not None:
            self.cursors[index].push(chunk.token_ids, chunk.logprobs)
        if not chunk.text:
            return None
        self.sent[index] += len(chunk.text)
        return self._chunk(index, {"content": chunk.text}, None, self.sent[index])

    def ending(self, index: int, completion) -> dict:
        upto = self.sent[index] if completion.finish_reason == "stop" else None
        return self._chunk(index, {}, protocol.openai_finish_reason(completion.finish_reason), upto)

    def usage(self, completions: list) -> dict:
        return protocol_chat.chat_chunk(self.cid, self.name, self.created, None, usage_=protocol_chat.usage(
            self.prompt_tokens, sum(c.completion_tokens for c in completions)))

    def _chunk(self, index: int, delta: dict, finish: str | None, upto: int | None, logprobs: bool = True) -> dict:
        cursor = self.cursors[index]
        lp = chat_shape(self.tokenizer, cursor.take(upto), self.top) if logprobs and cursor is not None else None
        return protocol_chat.chat_chunk(self.cid, self.name, self.created, delta, finish, index=index, logprobs=lp)
