"""Server settings: one frozen `ServerConfig`, built once from defaults, then the
environment, then command-line flags (later wins), validated, and logged once with
secrets masked. This is the only module in server/ that reads `os.environ`.

Every setting is declared once in `SETTINGS` (field, env var, parser, help), and both
the environment reader and the argparse flags are generated from that table, so
`--help` always lists exactly what the environment accepts.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting is invalid; names the environment variable and the rule it broke."""

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True)
class RateLimit:
    """`count` requests per `period_s` seconds (a fixed window)."""

    count: int
    period_s: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period_s:g}s"


def default_checkpoint() -> str:
    """The demo model shipped inside the installed `model` package."""
    import model

    return str(Path(model.__file__).resolve().parent / "demo")


@dataclass(frozen=True)
class ServerConfig:
    model_checkpoint: str = ""  # "" -> default_checkpoint(), resolved by load_config
    host: str = "0.0.0.0"
    port: int = 5000
    device: str | None = None  # None: cuda if available else cpu
    dtype: str | None = None  # None: float32 on cpu, bfloat16 on cuda
    quantize: str | None = None  # "int8": weight-only int8 at load (model/quant.py); None: weights as stored
    tokenizer_path: str | None = None
    api_key: str | None = None
    api_keys_file: str | None = None
    metrics_auth: bool = False
    rate_limit: RateLimit | None = None
    token_budget: int | None = None  # generated tokens per minute per key (or client address)
    redis_url: str | None = None
    max_length_limit: int = 1000  # the seed's upper bound on max_length / max_tokens
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0
    drain_seconds: float = 30.0
    cache_ttl: float = 3600.0  # 0 disables the response cache
    cache_max_entries: int = 4096
    max_batch: int = 32
    max_queue: int = 256
    prefill_chunk: int = 128  # prompt tokens per step while rows decode (model/engine/config.py)
    idle_prefill_chunk: int = 2048  # the most prompt tokens one step prefills
    cpu_linear: str = "auto"  # what runs the linear layers on CPU
    cpu_attention: str = "auto"  # what runs one-token attention on CPU
    cuda_kernels: str = "torch"  # what runs the decode step on CUDA (model/engine/cuda_setup.py)
    batch_invariant: bool = False  # every product and attention on the CPU kernels (model/engine/config.py)
    async_scheduling: bool = False  # launch each step before reading the last one's tokens (model/engine/core.py)
    engine_process: bool = False  # the engine core in a process of its own (docs/engine-process.md)
    log_prompts: bool = False
    log_level: str = "INFO"
    served_model_name: tuple[str, ...] = ()  # names clients send as `model`; the first is reported
    chat_template: str | None = None  # a Jinja2 chat template file (default: server/chat_template.py's)
    max_n: int = 16  # choices per prompt (`n`)
    max_logprobs: int = 20  # top alternatives per token (`logprobs`, `top_logprobs`)
    # Hostile clients and bad checkpoints (docs/security.md).
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 30.0
    max_connections: int = 1024
    max_connections_per_client: int = 256
    max_pickle_bytes: int = 256 << 20  # model/safe_load.py MAX_PICKLE_BYTES
    kv_cache_max_bytes: int = 16 << 30
    redis_retry_seconds: float = 5.0
    max_prompts_per_request: int = 32
    max_rows_per_caller: int = 0  # 0: MAX_BATCH less an eighth (at least one row) for other callers
    rate_limit_key: str | None = None  # a request header the per-caller limits key on (server/caller.py)
    rate_limit_key_max_bytes: int = 256
    max_prompt_bytes: int = 0  # 0: 32 bytes per position of the model's context (server/serving.py)
    tokenizer_threads: int = 2
    max_json_depth: int = 64  # no request field nests more than a few levels; far below the recursion limit

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key or self.api_keys_file)

    def masked(self) -> dict[str, Any]:
        """Every setting, with secrets replaced, for the start-up log line."""
        out: dict[str, Any] = {}
        for s in SETTINGS:
            value = getattr(self, s.field)
            if value is not None and s.secret:
                value = "***"
            elif s.field == "redis_url" and value:
                value = _mask_url(value)
            elif isinstance(value, RateLimit):
                value = str(value)
            out[s.env] = value
        return out


# ---------------------------------------------------------------- parsers

def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be an integer, got {raw!r}") from None
        if lo is not None and value < lo:
            raise ValueError(f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ValueError(f"must be <= {hi}, got {value}")
        return value

    return parse


def _float(lo: float = 0.0) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"must be a number, got {raw!r}") from None
        if not value >= lo or value == float("inf"):
            raise ValueError(f"must be a finite number >= {lo}, got {raw!r}")
        return value

    return parse


def _bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _str(raw: str) -> str | None:
    return raw.strip() or None


def _choice(*choices: str) -> Callable[[str], str | None]:
    def parse(raw: str) -> str | None:
        v = raw.strip()
        if not v:
            return None
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return v

    return parse


def _quantize(raw: str) -> str | None:
    v = raw.strip()
    return None if v in ("", "none") else _choice("int8", "none")(v)


def _device(raw: str) -> str | None:
    v = raw.strip()
    if not v:
        return None
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", v):
        raise ValueError(f"must be cpu, cuda, cuda:N or mps, got {raw!r}")
    return v


_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d+)?\s*(second|minute|hour|day)s?\s*$", re.I)


def parse_rate_limit(raw: str) -> RateLimit | None:
    """'10/minute', '10 per minute', '100 per 2 hours' (flask-limiter's spellings); '' is off."""
    if not raw.strip() or raw.strip().lower() in ("0", "off", "none"):
        return None
    m = _RATE_RE.match(raw)
    if not m:
        raise ValueError(f"must look like '10/minute' or '10 per minute', got {raw!r}")
    count, mult, unit = int(m.group(1)), int(m.group(2) or 1), m.group(3).lower()
    if count < 1 or mult < 1:
        raise ValueError(f"count and period must be >= 1, got {raw!r}")
    return RateLimit(count, mult * _PERIODS[unit])


def _names(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(","))
    if raw.strip() and not all(names):
        raise ValueError(f"must be a comma-separated list of non-empty names, got {raw!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {raw!r}")
    return names if raw.strip() else ()


# The Gateway API Inference Extension's flow-control header (gateway-api-inference-extension
# pkg/epp/metadata/consts.go, FlowFairnessIDKey): the tenant a gateway assigns a request to.
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")  # an HTTP field name (RFC 9110 5.1, 5.6.2)


def parse_rate_limit_key(raw: str) -> str | None:
    """'api_key' (or ''): the caller's API key, else its address; 'fairness': the gateway's fairness
    header; 'header:NAME': any header. Returns the header's name (lower case), None for api_key."""
    v = raw.strip()
    if v in ("", "api_key"):
        return None
    if v == "fairness":
        return FAIRNESS_HEADER
    name = v[len("header:"):].strip() if v.startswith("header:") else ""
    if not _TOKEN.match(name):
        raise ValueError(f"must be api_key, fairness or header:<HTTP header name>, got {raw!r}")
    return name.lower()


def _optional_positive_int(raw: str) -> int | None:
    if not raw.strip() or raw.strip() == "0":
        return None
    return _int(1)(raw)


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _redis_url(raw: str) -> str | None:
    v = raw.strip()
    if not v:
        return None
    if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got {_mask_url(v)!r}")
    return v


@dataclass(frozen=True)
class Setting:
    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("model_checkpoint", "MODEL_CHECKPOINT", _str,
            "checkpoint file or directory, or a https://, s3:// or hf:// URI fetched into NANOGPT_CACHE_DIR "
            "(docs/checkpoints.md; default: the embedded demo model)"),
    Setting("host", "HOST", _str, "address to listen on (default 0.0.0.0)"),
    Setting("port", "PORT", _int(0, 65535), "port to listen on (default 5000)"),
    Setting("device", "DEVICE", _device, "cpu, cuda, cuda:N (default: cuda if available)"),
    Setting("dtype", "DTYPE", _choice("float32", "bfloat16", "float16", "auto"),
            "weights dtype; auto keeps the checkpoint's (default: float32 on cpu, bfloat16 on cuda)"),
    Setting("quantize", "QUANTIZE", _quantize,
            "int8: weight-only int8, quantized at load (an int8 export loads as is); none (default): as stored"),
    Setting("tokenizer_path", "TOKENIZER_PATH", _str, "GPT-2 BPE ranks file (default: tiktoken's cache)"),
    Setting("api_key", "API_KEY", _str, "one accepted API key (X-API-Key or Authorization: Bearer)", secret=True),
    Setting("api_keys_file", "API_KEYS_FILE", _str, "file of accepted keys, one per line; re-read on change"),
    Setting("metrics_auth", "METRICS_AUTH", _bool, "require an API key for /metrics (default false)"),
    Setting("rate_limit", "RATE_LIMIT", parse_rate_limit,
            "requests per key (or client address), e.g. '10/minute' or '10 per minute' (default off)"),
    Setting("token_budget", "TOKEN_BUDGET", _optional_positive_int,
            "generated tokens per minute per key (or client address) (default off)"),
    Setting("redis_url", "REDIS_URL", _redis_url,
            "share rate limits and the response cache through Redis (default: in-memory)"),
    Setting("max_length_limit", "MAX_LENGTH_LIMIT", _int(1), "upper bound on max_length / max_tokens (default 1000)"),
    Setting("max_body_bytes", "MAX_BODY_BYTES", _int(1024), "largest request body in bytes (default 1048576)"),
    Setting("request_timeout", "REQUEST_TIMEOUT", _float(0.001), "seconds before a generation is abandoned (default 300)"),
    Setting("drain_seconds", "DRAIN_SECONDS", _float(0.0), "grace period for in-flight requests on SIGTERM (default 30)"),
    Setting("cache_ttl", "CACHE_TTL", _float(0.0), "seconds a deterministic response is cached; 0 disables (default 3600)"),
    Setting("cache_max_entries", "CACHE_MAX_ENTRIES", _int(1), "in-memory cache size (LRU entries, default 4096)"),
    Setting("max_batch", "MAX_BATCH", _int(1, 4096), "requests decoded together by the engine (default 32)"),
    Setting("max_queue", "MAX_QUEUE", _int(1), "waiting requests before 503 (default 256)"),
    Setting("prefill_chunk", "PREFILL_CHUNK", _int(1),
            "prompt tokens a step prefills beside decoding rows, per decoding row's worth of prompts waiting "
            "(default 128)"),
    Setting("idle_prefill_chunk", "IDLE_PREFILL_CHUNK", _int(1),
            "the most prompt tokens one step prefills (default 2048)"),
    Setting("cpu_linear", "CPU_LINEAR", _choice("auto", "kernel", "out_in", "in_out"),
            "CPU decode matrix products: our kernel, torch's in either weight layout, or auto (time them; default)"),
    Setting("cpu_attention", "CPU_ATTENTION", _choice("auto", "kernel", "torch"),
            "CPU decode attention: our fused kernel, torch's operators, or auto (the kernel where it builds; default)"),
    Setting("cuda_kernels", "CUDA_KERNELS", _choice("auto", "triton", "torch"),
            "CUDA decode step: our Triton kernels (five launches a block, one graph per batch size), torch's "
            "operators (default: the Triton path has not yet run on a GPU), or auto (triton where it imports)"),
    Setting("async_scheduling", "ASYNC_SCHEDULING", _bool,
            "launch each decode step before the host reads the tokens of the one before, so the GPU does not "
            "wait on the host; eos and stop strings take effect one step late, the extra token dropped "
            "(default false until measured on a GPU)"),
    Setting("batch_invariant", "BATCH_INVARIANT", _bool,
            "CPU: every matrix product and attention (prefill too) on our kernels, so that a request's numbers do "
            "not depend on what is batched beside it (default false: prefill on torch's faster GEMMs)"),
    Setting("served_model_name", "SERVED_MODEL_NAME", _names,
            "model name(s) clients send, comma-separated; the first is reported, the rest are aliases "
            "(default: the checkpoint's name)"),
    Setting("chat_template", "CHAT_TEMPLATE", _str,
            "Jinja2 chat template file for /v1/chat/completions (default: a plain transcript, docs/api.md)"),
    Setting("max_n", "MAX_N", _int(1, 128), "most choices per prompt, `n` (default 16)"),
    Setting("max_logprobs", "MAX_LOGPROBS", _int(0, 100),
            "most top alternatives per token, `logprobs` / `top_logprobs` (default 20)"),
    Setting("engine_process", "ENGINE_PROCESS", _bool,
            "run the engine core (model, scheduler, KV cache) in a process of its own, so the HTTP event loop "
            "and the engine's step loop do not share one interpreter lock (default false; docs/engine-process.md)"),
    Setting("log_prompts", "LOG_PROMPTS", _bool, "include prompts in access logs (default false)"),
    Setting("log_level", "LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "log level (default INFO)"),
    Setting("header_timeout", "HEADER_TIMEOUT", _float(0.001),
            "seconds a client may take to send a request's head, from its first byte (default 10)"),
    Setting("body_timeout", "BODY_TIMEOUT", _float(0.001),
            "seconds a client may take to send a request body after its head; then 408 (default 60)"),
    Setting("keepalive_timeout", "KEEPALIVE_TIMEOUT", _float(0.001),
            "seconds an idle keep-alive connection stays open (default 30)"),
    Setting("max_connections", "MAX_CONNECTIONS", _int(1),
            "open client connections before new ones get 503; lowered to fit the file limit (default 1024)"),
    Setting("max_connections_per_client", "MAX_CONNECTIONS_PER_CLIENT", _int(1),
            "open connections per client address (default 256)"),
    Setting("max_pickle_bytes", "MAX_PICKLE_BYTES", _int(1024),
            "the most a checkpoint's pickle (and any compressed record) may inflate to (default 268435456)"),
    Setting("kv_cache_max_bytes", "KV_CACHE_MAX_BYTES", _int(1),
            "refuse a model whose KV cache (MAX_BATCH rows x block_size) would exceed this (default 17179869184)"),
    Setting("max_prompt_bytes", "MAX_PROMPT_BYTES", _int(0),
            "longest prompt in UTF-8 bytes, refused before tokenizing; 0: 32 x the model's block_size (default 0)"),
    Setting("tokenizer_threads", "TOKENIZER_THREADS", _int(1, 64),
            "threads that tokenize long prompts off the event loop (default 2)"),
    Setting("max_prompts_per_request", "MAX_PROMPTS_PER_REQUEST", _int(1),
            "prompts in one /batch_generate or /v1/completions request (default 32)"),
    Setting("max_rows_per_caller", "MAX_ROWS_PER_CALLER", _int(0),
            "engine requests one API key (or client address) may hold at once; the rest wait their turn, "
            "round robin across callers; 0: MAX_BATCH less an eighth, at least one row (default 0)"),
    Setting("rate_limit_key", "RATE_LIMIT_KEY", parse_rate_limit_key,
            "what RATE_LIMIT, TOKEN_BUDGET and MAX_ROWS_PER_CALLER count per: api_key (the API key, else the "
            "client address; default), fairness (the Gateway API Inference Extension's "
            f"{FAIRNESS_HEADER} header) or header:NAME; a request without the header counts as its API key. "
            "Only for a header a trusted gateway sets: a client that can set it picks its own bucket"),
    Setting("rate_limit_key_max_bytes", "RATE_LIMIT_KEY_MAX_BYTES", _int(1, 8190),
            "longest RATE_LIMIT_KEY header value; longer gets 400 (default 256)"),
    Setting("redis_retry_seconds", "REDIS_RETRY_SECONDS", _float(0.01),
            "after a Redis failure, skip Redis this long and probe it in the background (default 5)"),
    Setting("max_json_depth", "MAX_JSON_DEPTH", _int(2, 500), "deepest nesting of a JSON request body (default 64)"),
)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanogpt-serve",
        description="Serve a nanoGPT model over HTTP (the seed's API and an OpenAI-compatible API). "
        "Every flag can also be set through the environment variable shown; flags win.",
    )
    for s in SETTINGS:
        if s.parse is _bool:  # `--log-prompts` alone means true; `--log-prompts false` also works
            parser.add_argument(s.flag, dest=s.field, metavar="BOOL", nargs="?", const="true", default=None,
                                help=f"{s.help} [env {s.env}]")
        else:
            parser.add_argument(s.flag, dest=s.field, metavar=s.env, default=None, help=f"{s.help} [env {s.env}]")
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Defaults, then `environ` (default os.environ), then `argv` flags; raises ConfigError."""
    environ = os.environ if environ is None else environ
    flags = vars(build_arg_parser().parse_args([] if argv is None else list(argv)))
    values: dict[str, Any] = {}
    for s in SETTINGS:
        for source, raw in ((s.env, environ.get(s.env)), (s.flag, flags.get(s.field))):
            if raw is None:
                continue
            try:
                value = s.parse(raw)
            except ValueError as e:
                raise ConfigError(source, str(e)) from None
            if value is None and s.field in ("host", "port", "cpu_linear", "cpu_attention", "cuda_kernels"):
                continue  # an empty HOST (or CPU_LINEAR, ...) keeps the default
            values[s.field] = value
    if not values.get("model_checkpoint"):
        values["model_checkpoint"] = default_checkpoint()
    config = ServerConfig(**values)
    validate(config)
    _check_checkpoint_source(config.model_checkpoint, environ)
    return config


def _check_checkpoint_source(text: str, environ: Mapping[str, str]) -> None:
    """A URI's syntax and scheme (http:// only when allowed) are checked here, so a typo fails at start-up
    rather than after the engine's set-up; the fetch settings (NANOGPT_*) are model.fetch's own."""
    from model.fetch import FetchConfigError, FetchSettings, check_source

    try:
        check_source(text, FetchSettings.from_env(environ))
    except FetchConfigError as e:
        raise ConfigError(e.variable, e.problem) from None
    except ValueError as e:
        raise ConfigError("MODEL_CHECKPOINT", str(e)) from None


def validate(config: ServerConfig) -> None:
    if config.api_keys_file and not Path(config.api_keys_file).is_file():
        raise ConfigError("API_KEYS_FILE", f"no such file: {config.api_keys_file}")
    if config.chat_template and not Path(config.chat_template).is_file():
        raise ConfigError("CHAT_TEMPLATE", f"no such file: {config.chat_template}")
    if config.tokenizer_path and not Path(config.tokenizer_path).is_file():
        raise ConfigError("TOKENIZER_PATH", f"no such file: {config.tokenizer_path}")
    if config.metrics_auth and not config.auth_enabled:
        raise ConfigError("METRICS_AUTH", "needs API_KEY or API_KEYS_FILE")
    if config.batch_invariant and config.cpu_linear not in ("auto", "kernel"):
        raise ConfigError("BATCH_INVARIANT", f"runs every product on the kernel; CPU_LINEAR={config.cpu_linear} "
                                             "contradicts it (auto or kernel)")
    if config.batch_invariant and config.device and config.device.startswith("cuda"):
        raise ConfigError("BATCH_INVARIANT", f"runs on CPU only so far; DEVICE={config.device} contradicts it")
    if config.batch_invariant and config.cpu_attention == "torch":
        raise ConfigError("BATCH_INVARIANT", "runs attention on the kernel; CPU_ATTENTION=torch contradicts it "
                                             "(auto or kernel)")


def log_config(config: ServerConfig) -> None:
    log.info("configuration", extra={"config": config.masked()})

