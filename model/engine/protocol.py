"""The messages between the server process (model/engine/client.py) and the engine-core
process (model/engine/core_process.py), as msgspec structs over msgpack.

    client -> core   Submit | Cancel | Shutdown            (one PUSH/PULL socket)
    core -> client   Hello once, then Outputs per step      (another PUSH/PULL socket)

`Outputs` is the one compact message of a step: the new token ids of every request that
produced some, the requests that ended, and the engine's counters (and logprobs, for the
requests that asked for them). Text never crosses: the
client detokenizes and looks for stop strings. Outputs that pile up while the client's loop
is busy are merged by the core before they are sent, so a slow reader costs one message,
not one per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from model.engine.config import EngineConfig
from model.logprobs import TokenLogprob


@dataclass(frozen=True)
class CoreSpec:
    """What the core process needs to build its engine: the checkpoint and the engine's config."""
    checkpoint: str
    device: str | None = None
    dtype: str | None = None
    tokenizer_path: str | None = None
    engine: EngineConfig = EngineConfig()
    # ("module:function", kwargs): called with the built Engine before it starts, in the core
    # process. For harnesses only (bench/sim_device.py replaces the forward); never from settings.
    prepare: tuple[str, dict] | None = None
    quantize: str | None = None  # load_model_from_checkpoint's: "int8" quantizes at load


class Params(msgspec.Struct, array_like=True):
    """SamplingParams without the stop strings (the client's business)."""
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop_at_eot: bool
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class Submit(msgspec.Struct, tag=True, array_like=True):
    rid: int
    prompt_ids: list[int]
    params: Params


class Cancel(msgspec.Struct, tag=True, array_like=True):
    rid: int


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    drain: bool
    timeout: float | None


class Finish(msgspec.Struct, array_like=True):
    """A request the core retired: why, and its times as the core measured them."""
    rid: int
    reason: str  # length | eos | cancelled | error
    queue_s: float
    error: str | None = None
    retry_after: float | None = None  # set when the core refused it as overloaded


class Stats(msgspec.Struct, array_like=True):
    running: int
    waiting: int
    kv_cache_usage: float
    tokens_per_second: float
    total_steps: int
    last_batch_size: int


class Scored(msgspec.Struct, array_like=True):
    """model.logprobs.TokenLogprob on the wire: the token, its logprob, the top (id, logprob)."""
    token: int
    logprob: float
    top: list[tuple[int, float]] = []


class Outputs(msgspec.Struct, tag=True, array_like=True):
    tokens: list[tuple[int, list[int]]]  # (rid, new token ids), in the order they were sampled
    finished: list[Finish]
    stats: Stats
    # Only for the requests that asked, so the others' messages carry nothing more: (rid, a Scored
    # per new token in `tokens`), and once per request (rid, the prompt's, the first None).
    logprobs: list[tuple[int, list[Scored]]] = []
    prompt_logprobs: list[tuple[int, list[Scored | None]]] = []


class Hello(msgspec.Struct, tag=True, array_like=True):
    """The core is up (error None) or failed to start. Everything the client reports about the
    model comes from here; the client never loads the weights."""
    error: str | None = None
    tokenizer: dict = {}
    block_size: int = 0
    n_vocab: int = 0
    device: str = ""
    dtype: str = ""
    kv_cache_bytes: int = 0
    cpu_linear: str | None = None
    cpu_attention: str | None = None
    checkpoint: dict = {}  # CheckpointInfo's fields


ToCore = Submit | Cancel | Shutdown
FromCore = Hello | Outputs


def to_wire(entry: TokenLogprob | None) -> Scored | None:
    """A TokenLogprob (or None) as a Scored."""
    return None if entry is None else Scored(entry.token, entry.logprob, list(entry.top))


def from_wire(entry: Scored | None) -> TokenLogprob | None:
    """A Scored (or None) as the TokenLogprob it was."""
    return None if entry is None else TokenLogprob(entry.token, entry.logprob, tuple(map(tuple, entry.top)))
