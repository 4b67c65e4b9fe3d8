"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions (JSON or SSE)."""

from __future__ import annotations

import time

from aiohttp import web

from . import keys, protocol, sse
from .errors import NotFound
from .middleware import ACCESS, note_access, read_json

routes = web.RouteTableDef()


def _model_name(app: web.Application) -> str:
    lifecycle = app[keys.LIFECYCLE]
    lifecycle.engine_or_raise()
    return lifecycle.model.name


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    lifecycle = request.app[keys.LIFECYCLE]
    name = _model_name(request.app)
    return web.json_response(protocol.models_response(name, lifecycle.model.created))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    req = protocol.parse_completion(await read_json(request), protocol.Limits.of(request.app[keys.CONFIG]))
    name = _model_name(request.app)
    if req.model is not None and req.model != name:
        raise NotFound(f"model {req.model!r} is not served here; this server serves {name!r}", param="model",
                       code="model_not_found")
    gen = request.app[keys.GENERATOR]
    field = "prompt" if len(req.prompts) == 1 else None
    prompts = [await gen.prompt(p, field or f"prompt[{i}]") for i, p in enumerate(req.prompts)]
    if req.stream:
        return await _stream(request, name, prompts[0], req)
    completions = await gen.complete(prompts, req.params, request[keys.IDENTITY])
    note_access(request, prompts, completions)
    choices = [protocol.completion_choice(i, (p.text if req.echo else "") + c.text,
                                          protocol.openai_finish_reason(c.finish_reason))
               for i, (p, c) in enumerate(zip(prompts, completions))]
    return web.json_response(protocol.completion_response(
        protocol.completion_id(), name, choices,
        sum(len(p.ids) for p in prompts), sum(c.completion_tokens for c in completions)))


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
