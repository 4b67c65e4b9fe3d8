"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions (JSON or SSE; n, echo, logprobs)."""

from __future__ import annotations

import time

from aiohttp import web

from . import keys, protocol, sse
from .middleware import ACCESS, note_access, read_json
from .protocol_logprobs import completion_logprobs
from .served import served_name

routes = web.RouteTableDef()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    served_name(request.app, None)  # 503 while loading
    m = request.app[keys.LIFECYCLE].model
    return web.json_response(protocol.models_response(m.names, m.created, m.path, m.max_model_len))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    req = protocol.parse_completion(await read_json(request), protocol.Limits.of(request.app[keys.CONFIG]))
    name = served_name(request.app, req.model)
    gen = request.app[keys.GENERATOR]
    field = "prompt" if len(req.prompts) == 1 else None
    prompts = [await gen.prompt(p, field or f"prompt[{i}]") for i, p in enumerate(req.prompts)]
    if req.stream:
        return await _stream(request, name, prompts[0], req)
    each = protocol.choice_params(req.params, req.n)
    expanded = [p for p in prompts for _ in range(req.n)]  # choice i*n + j: prompt i, sample j
    completions = await gen.complete(expanded, each * len(prompts), request[keys.IDENTITY])
    note_access(request, prompts, completions)
    tokenizer = request.app[keys.LIFECYCLE].engine.tokenizer
    choices = [_choice(i, p, c, req, tokenizer) for i, (p, c) in enumerate(zip(expanded, completions))]
    generated = 0 if req.echo_only else sum(c.completion_tokens for c in completions)
    return web.json_response(protocol.completion_response(
        protocol.completion_id(), name, choices, sum(len(p.ids) for p in prompts), generated))


def _choice(index: int, prompt, c, req: protocol.CompletionRequest, tokenizer) -> dict:
    text = (prompt.text if req.echo else "") + ("" if req.echo_only else c.text)
    finish = "length" if req.echo_only else protocol.openai_finish_reason(c.finish_reason)
    logprobs = None
    if req.params.logprobs is not None:
        ids, entries = [], []
        if req.echo:
            ids, entries = list(prompt.ids), list(c.prompt_logprobs)
        if not req.echo_only:
            ids, entries = ids + list(c.token_ids), entries + list(c.logprobs)
        logprobs = completion_logprobs(tokenizer, ids, entries, len(text) if c.finish_reason == "stop" else None)
    return protocol.completion_choice(index, text, finish, logprobs)


async def _stream(request: web.Request, name: str, prompt, req: protocol.CompletionRequest) -> web.StreamResponse:
    gen = request.app[keys.GENERATOR]
    cid, created = protocol.completion_id(), int(time.time())
    note_access(request, [prompt])

    def chunk(text: str, finish_reason: str | None) -> dict:
        return protocol.completion_chunk(cid, name, created, [protocol.completion_choice(0, text, finish_reason)])

    async def deltas():
        if req.echo:
            yield chunk(prompt.text, None)
        async for text in stream:
            yield chunk(text, None)

    async with gen.stream(prompt, req.params, request[keys.IDENTITY]) as stream:
        response = await sse.open_stream(request)
        if await sse.pump(response, deltas(), request.app[keys.CONFIG].request_timeout):
            c = stream.completion
            request[ACCESS]["completion_tokens"] = c.completion_tokens
            await sse.send(response, chunk("", protocol.openai_finish_reason(c.finish_reason)))
            if req.include_usage:
                usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": c.completion_tokens,
                         "total_tokens": len(prompt.ids) + c.completion_tokens}
                await sse.send(response, protocol.completion_chunk(cid, name, created, [], usage))
        await sse.done(response)
    return response
