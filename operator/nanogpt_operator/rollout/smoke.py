"""The NanoGPTRollout's smoke-test gate: one real POST /generate through a model's Service.

`SmokeTest` is the interface the rollout handlers call: an async callable from (endpoint URL, gate) to a
`SmokeResult`. It never raises for a failing model; every HTTP or network problem becomes a failed
result whose message a person can act on. `HttpSmokeTest` is the real one; tests point it at a server
on 127.0.0.1 simply by giving the model that endpoint, or inject another callable into the handlers.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import aiohttp

from nanogpt_operator.rollout.spec import SmokeGate
from nanogpt_operator.rollout.state_machine import SmokeResult

# A short generation on a loaded model takes well under this; a cold model can be slow on its first call.
DEFAULT_TIMEOUT_S = 60.0
# How much of an error body to quote in status: enough for the server's JSON error, no more.
QUOTE_CHARS = 200


class SmokeTest(Protocol):
    async def __call__(self, endpoint: str, gate: SmokeGate, api_key: str | None = None) -> SmokeResult: ...


def judge(status: int, body: Any) -> SmokeResult:
    """The verdict on one /generate response: 200 with a non-empty `generated_text`."""
    if status != 200:
        return SmokeResult(False, f"POST /generate answered {status}: {str(body)[:QUOTE_CHARS]}")
    text = body.get("generated_text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text:
        return SmokeResult(False, f"POST /generate answered 200 without generated_text: {str(body)[:QUOTE_CHARS]}")
    return SmokeResult(True, f"generated {len(text)} characters")


class HttpSmokeTest:
    """The real smoke test over one shared aiohttp session (created in the operator's event loop)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    @classmethod
    def create(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> HttpSmokeTest:
        return cls(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)))

    async def close(self) -> None:
        await self._session.close()

    async def __call__(self, endpoint: str, gate: SmokeGate, api_key: str | None = None) -> SmokeResult:
        url = endpoint.rstrip("/") + "/generate"
        payload = {"prompt": gate.prompt, "max_length": gate.max_length}
        # The server takes `Authorization: Bearer <key>` (server/auth.py); the key is never logged.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            async with self._session.post(url, json=payload, headers=headers) as response:
                try:
                    body: Any = await response.json(content_type=None)
                except ValueError:
                    body = await response.text()
                return judge(response.status, body)
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            return SmokeResult(False, f"POST {url} failed: {type(err).__name__}: {err}")
