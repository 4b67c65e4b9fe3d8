"""The seed's API, exactly: POST /generate, POST /batch_generate, GET /health; plus the
Kubernetes probes /healthz and /readyz, and /metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import keys, protocol, sse
from .middleware import ACCESS, note_access, read_json

routes = web.RouteTableDef()


@routes.post("/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    req = protocol.parse_generate(await read_json(request), protocol.Limits.of(request.app[keys.CONFIG]))
    gen = request.app[keys.GENERATOR]
    prompt = await gen.prompt(req.prompts[0], "prompt")
    if req.stream:
        return await _stream_generate(request, prompt, req.params)
    [completion] = await gen.complete([prompt], req.params, request[keys.IDENTITY])
    note_access(request, [prompt], [completion])
    return web.json_response(protocol.seed_result(prompt.text, completion.text, completion.completion_tokens))


async def _stream_generate(request: web.Request, prompt, params) -> web.StreamResponse:
    """SSE: `data: {"text": delta}` per chunk, then the /generate object plus finish_reason, then [DONE]."""
    gen = request.app[keys.GENERATOR]
    note_access(request, [prompt])
    async with gen.stream(prompt, params, request[keys.IDENTITY]) as stream:
        response = await sse.open_stream(request)
        deltas = ({"text": text} async for text in stream)
        if await sse.pump(response, deltas, request.app[keys.CONFIG].request_timeout):
            c = stream.completion
            request[ACCESS]["completion_tokens"] = c.completion_tokens
            await sse.send(response, {**protocol.seed_result(prompt.text, c.text, c.completion_tokens),
                                      "finish_reason": c.finish_reason})
        await sse.done(response)
    return response


@routes.post("/batch_generate")
async def batch_generate(request: web.Request) -> web.Response:
    req = protocol.parse_batch(await read_json(request), protocol.Limits.of(request.app[keys.CONFIG]))
    gen = request.app[keys.GENERATOR]
    prompts = [await gen.prompt(p, f"prompts[{i}]") for i, p in enumerate(req.prompts)]
    completions = await gen.complete(prompts, req.params, request[keys.IDENTITY])
    note_access(request, prompts, completions)
    return web.json_response({"results": [protocol.seed_result(p.text, c.text, c.completion_tokens)
                                          for p, c in zip(prompts, completions)]})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    lifecycle = request.app[keys.LIFECYCLE]
    config = request.app[keys.CONFIG]
    m = lifecycle.model
    status = health_status(lifecycle)
    body = {
        "status": status,
        "ready": lifecycle.ready,
        "draining": lifecycle.draining,
        "device": m.device if m else (config.device or "unknown"),
        "dtype": m.dtype if m else config.dtype,
        "model": m.name if m else None,
        "checkpoint": m.path if m else config.model_checkpoint,
        "checkpoint_digest": m.digest if m else None,
        "parameters": m.n_params if m else None,
    }
    if lifecycle.engine is not None:
        s = lifecycle.engine.stats()
        body["engine"] = {"running": s.running, "waiting": s.waiting, "max_batch": s.max_batch,
                          "kv_cache_usage": s.kv_cache_usage, "tokens_per_second": s.tokens_per_second}
    if lifecycle.load_error:
        body["error"] = lifecycle.load_error
    return web.json_response(body, status=200 if status == "healthy" else 503)


def health_status(lifecycle) -> str:
    """healthy (200) only when a request would be served; else why not (503), as TGI's and vLLM's
    /health do: a client that waits for healthy can send at once."""
    if not lifecycle.alive:
        return "unhealthy"  # the model failed to load, or the engine loop died
    if lifecycle.draining:
        return "draining"
    return "healthy" if lifecycle.ready else "loading"


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers and the engine loop (once started) is alive."""
    lifecycle = request.app[keys.LIFECYCLE]
    return web.json_response({"alive": lifecycle.alive}, status=200 if lifecycle.alive else 503)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Readiness: model loaded and warmed up, not draining."""
    lifecycle = request.app[keys.LIFECYCLE]
    ready = lifecycle.ready
    return web.json_response({"ready": ready, "draining": lifecycle.draining}, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[keys.METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
