"""The engine's errors, one base class:

    EngineError
    ├── Overloaded      the waiting queue is full (retry_after seconds)
    ├── PromptTooLong   the prompt leaves no room for a new token (also a ValueError)
    └── EngineStopped   the engine is draining or stopped
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the engine's errors."""


class Overloaded(EngineError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"engine overloaded, retry after {retry_after:.1f}s")
        self.retry_after = retry_after


class PromptTooLong(EngineError, ValueError):
    """The prompt does not leave room for one new token in the model's context."""

    def __init__(self, n_tokens: int, limit: int):
        super().__init__(f"prompt has {n_tokens} tokens; the limit is {limit - 1} (block_size {limit})")
        self.n_tokens, self.limit = n_tokens, limit


class EngineStopped(EngineError):
    """The engine is draining or stopped and takes no new requests."""
