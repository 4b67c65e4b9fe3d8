"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions (JSON or SSE; n, echo, logprobs, all
of them streamed too)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from . import keys, protocol
from .middleware import note_access, read_json
from .protocol_logprobs import LogprobCursor, completion_logprobs, completion_shape
from .served import served_name
from .sse_choices import stream_choices

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
        return await _stream(request, name, prompts, req)
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


async def _stream(request: web.Request, name: str, prompts: list, req: protocol.CompletionRequest):
    """The choices of `prompts` x n streamed: choice i*n + j is prompt i's sample j, as in JSON."""
    gen = request.app[keys.GENERATOR]
    note_access(request, prompts)
    expanded = [p for p in prompts for _ in range(req.n)]
    params = protocol.choice_params(req.params, req.n) * len(prompts)
    async with gen.streams(expanded, params, request[keys.IDENTITY]) as streams:
        events = _CompletionEvents(name, expanded, req, request.app[keys.LIFECYCLE].engine.tokenizer)
        return await stream_choices(request, streams, events, req.include_usage)


@dataclass
class _StreamedChoice:
    prompt: object  # serving.Prompt
    cursor: LogprobCursor | None  # None: no logprobs asked
    echoed: bool  # the prompt has been sent (or is not to be)
    sent: int = 0  # characters of the choice's text sent so far


class _CompletionEvents:
    """Completion chunks (server/sse_choices.ChoiceEvents): with echo, the prompt (and its
    logprobs) goes out with the choice's first text, as vLLM does; max_tokens 0 sends it alone
    at the end. Each chunk's logprobs are those of the tokens its text starts (LogprobCursor)."""

    def __init__(self, name: str, prompts: list, req: protocol.CompletionRequest, tokenizer):
        self.cid, self.name, self.created, self.req = protocol.completion_id(), name, int(time.time()), req
        asked = req.params.logprobs is not None
        self.choices = [_StreamedChoice(p, LogprobCursor(tokenizer) if asked else None, not req.echo)
                        for p in prompts]
        self.tokenizer, self.prompt_tokens = tokenizer, sum(len(p.ids) for p in prompts[::req.n])

    def opening(self, index: int) -> None:
        return None

    def delta(self, index: int, chunk) -> dict | None:
        if self.req.echo_only:
            return None  # what it generates is not shown
        c = self.choices[index]
        text = self._echo(c, chunk.prompt_logprobs) + chunk.text
        if c.cursor is not None:
            c.cursor.push(chunk.token_ids, chunk.logprobs)
        if not text:
            return None
        c.sent += len(text)
        return self._chunk(index, text, None, c.sent)

    def ending(self, index: int, completion) -> dict:
        c = self.choices[index]
        text = self._echo(c, completion.prompt_logprobs)
        c.sent += len(text)
        finish = "length" if self.req.echo_only else protocol.openai_finish_reason(completion.finish_reason)
        return self._chunk(index, text, finish, c.sent if completion.finish_reason == "stop" else None)

    def usage(self, completions: list) -> dict:
        generated = 0 if self.req.echo_only else sum(c.completion_tokens for c in completions)
        return protocol.completion_chunk(self.cid, self.name, self.created, [], protocol.usage(
            self.prompt_tokens, generated))

    def _echo(self, c: _StreamedChoice, prompt_logprobs) -> str:
        if c.echoed:
            return ""
        c.echoed = True
        if c.cursor is not None:
            c.cursor.push(c.prompt.ids, prompt_logprobs)
        return c.prompt.text

    def _chunk(self, index: int, text: str, finish: str | None, upto: int | None) -> dict:
        cursor = self.choices[index].cursor
        logprobs = None if cursor is None else completion_shape(self.tokenizer, cursor.take(upto))
        return protocol.completion_chunk(self.cid, self.name, self.created,
                                         [protocol.completion_choice(index, text, finish, logprobs)])
