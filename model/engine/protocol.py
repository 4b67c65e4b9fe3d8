"""The messages between the server process (model/engine/client.py) and the engine-core
process (model/engine/core_process.py), as msgspec structs over msgpack.

    client -> core   Submit | Cancel | Shutdown            (one PUSH/PULL socket)
    core -> client   Hello once, then Outputs per step      (another PUSH/PULL socket)

`Outputs` is the one compact message of a step: the new token ids of every request that
produced some, the requests that ended, and the engine's counters. Text never crosses: the
client detokenizes and looks for stop strings. Outputs that pile up while the client's loop
is busy are merged by the core before they are sent, so a slow reader costs one message,
not one per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from model.engine.config import EngineConfig


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


class Outputs(msgspec.Struct, tag=True, array_like=True):
    tokens: list[tuple[int, list[int]]]  # (rid, new token ids), in the order they were sampled
    finished: list[Finish]
    stats: Stats


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
