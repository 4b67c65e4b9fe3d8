"""ServerConfig: defaults, then environment, then flags; errors name the variable; secrets masked."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import model
from server.config import SETTINGS, ConfigError, RateLimit, ServerConfig, load_config, log_config, parse_rate_limit


def test_defaults():
    c = load_config([], {})
    assert c.model_checkpoint == str(Path(model.__file__).resolve().parent / "demo")
    assert (c.host, c.port, c.max_length_limit, c.max_body_bytes, c.drain_seconds) == ("0.0.0.0", 5000, 1000,
                                                                                       1 << 20, 30.0)
    assert c.rate_limit is None and c.redis_url is None and c.api_key is None and not c.log_prompts


def test_environment_then_flags():
    env = {"PORT": "8080", "HOST": "127.0.0.1", "RATE_LIMIT": "10 per minute", "MAX_BATCH": "8",
           "LOG_PROMPTS": "true", "CACHE_TTL": "0"}
    c = load_config([], env)
    assert (c.port, c.host, c.rate_limit, c.max_batch, c.log_prompts, c.cache_ttl) == (
        8080, "127.0.0.1", RateLimit(10, 60.0), 8, True, 0.0)
    c = load_config(["--port", "9000", "--rate-limit", "5/second", "--log-prompts", "false"], env)
    assert (c.port, c.rate_limit, c.log_prompts) == (9000, RateLimit(5, 1.0), False)
    assert load_config(["--metrics-auth", "--api-key", "k"], {}).metrics_auth is True
    assert load_config([], {"CPU_LINEAR": "kernel"}).cpu_linear == "kernel"
    assert load_config(["--cpu-linear", "out_in"], {"CPU_LINEAR": ""}).cpu_linear == "out_in"
    assert load_config([], {"CPU_LINEAR": ""}).cpu_linear == "auto"
    assert load_config([], {"CPU_ATTENTION": "torch"}).cpu_attention == "torch"


def test_prefill_budgets_reach_the_engine():
    from model.engine import EngineConfig
    from server.app import load_engine
    c = load_config([], {})  # the engine's own defaults (server/config.py does not import torch)
    assert (c.prefill_chunk, c.idle_prefill_chunk) == (EngineConfig.prefill_chunk, EngineConfig.idle_prefill_chunk)
    engine = load_engine(load_config(["--idle-prefill-chunk", "256"], {"PREFILL_CHUNK": "64", "DEVICE": "cpu"}))
    assert (engine.config.prefill_chunk, engine.config.idle_prefill_chunk) == (64, 256)
    assert engine.config.batch_invariant is False
    engine = load_engine(load_config(["--batch-invariant"], {"DEVICE": "cpu"}))
    assert engine.config.batch_invariant is True and engine.config.async_scheduling is False
    assert c.async_scheduling is EngineConfig.async_scheduling
    engine = load_engine(load_config([], {"DEVICE": "cpu", "ASYNC_SCHEDULING": "true", "ENGINE_PROCESS": "true"}))
    assert engine.spec.engine.async_scheduling is True  # the core process builds its engine from the spec


def test_quantize_int8_quantizes_the_checkpoint_at_load():
    import torch
    from server.app import load_engine
    assert load_config([], {}).quantize is None and load_config([], {"QUANTIZE": "none"}).quantize is None
    assert load_config(["--quantize", "int8"], {}).quantize == "int8"
    with pytest.raises(ConfigError, match="QUANTIZE: must be one of int8, none, got 'int4'"):
        load_config([], {"QUANTIZE": "int4"})
    engine = load_engine(load_config([], {"QUANTIZE": "int8", "DEVICE": "cpu"}))
    assert engine.model.quantization == "int8"
    assert engine.model.transformer.h[0].mlp.c_fc.weight.dtype == torch.int8


@pytest.mark.parametrize("env, problem", [
    ({"CPU_LINEAR": "out_in"}, "CPU_LINEAR=out_in contradicts it"),
    ({"CPU_ATTENTION": "torch"}, "CPU_ATTENTION=torch contradicts it"),
    ({"DEVICE": "cuda:1"}, "CPU only so far; DEVICE=cuda:1 contradicts it"),
])
def test_batch_invariant_refuses_settings_that_contradict_it(env, problem):
    with pytest.raises(ConfigError) as e:
        load_config([], {"BATCH_INVARIANT": "true", **env})
    assert e.value.variable == "BATCH_INVARIANT" and problem in str(e.value)
    assert load_config([], {"BATCH_INVARIANT": "true", "CPU_LINEAR": "kernel"}).batch_invariant is True


@pytest.mark.parametrize("raw, expected", [
    ("10/minute", RateLimit(10, 60)), ("10 per minute", RateLimit(10, 60)), ("100 per 2 hours", RateLimit(100, 7200)),
    ("3/second", RateLimit(3, 1)), ("5 per day", RateLimit(5, 86400)), ("", None), ("off", None),
])
def test_rate_limit_spellings(raw, expected):
    assert parse_rate_limit(raw) == expected


@pytest.mark.parametrize("env, variable", [
    ({"PORT": "abc"}, "PORT"), ({"PORT": "70000"}, "PORT"), ({"RATE_LIMIT": "lots"}, "RATE_LIMIT"),
    ({"MAX_LENGTH_LIMIT": "0"}, "MAX_LENGTH_LIMIT"), ({"DEVICE": "tpu"}, "DEVICE"), ({"DTYPE": "int8"}, "DTYPE"),
    ({"REDIS_URL": "http://x"}, "REDIS_URL"), ({"LOG_PROMPTS": "maybe"}, "LOG_PROMPTS"),
    ({"API_KEYS_FILE": "/nonexistent/keys"}, "API_KEYS_FILE"), ({"METRICS_AUTH": "1"}, "METRICS_AUTH"),
    ({"DRAIN_SECONDS": "-1"}, "DRAIN_SECONDS"), ({"REQUEST_TIMEOUT": "nan"}, "REQUEST_TIMEOUT"),
    ({"CPU_LINEAR": "fast"}, "CPU_LINEAR"), ({"CPU_ATTENTION": "flash"}, "CPU_ATTENTION"),
    ({"PREFILL_CHUNK": "0"}, "PREFILL_CHUNK"), ({"IDLE_PREFILL_CHUNK": "-5"}, "IDLE_PREFILL_CHUNK"),
    ({"QUANTIZE": "int4"}, "QUANTIZE"),
])
def test_errors_name_the_variable(env, variable):
    with pytest.raises(ConfigError) as e:
        load_config([], env)
    assert e.value.variable == variable and str(e.value).startswith(variable)


def test_flag_errors_name_the_flag():
    with pytest.raises(ConfigError) as e:
        load_config(["--port", "x"], {})
    assert e.value.variable == "--port"


def test_secrets_are_masked_in_the_log(caplog):
    caplog.set_level(logging.INFO)
    c = load_config([], {"API_KEY": "topsecret", "REDIS_URL": "redis://user:hunter2@redis:6379/0"})
    log_config(c)
    [record] = [r for r in caplog.records if r.getMessage() == "configuration"]
    assert record.config["API_KEY"] == "***"
    assert record.config["REDIS_URL"] == "redis://user:***@redis:6379/0"
    assert "topsecret" not in repr(record.__dict__) and "hunter2" not in repr(record.__dict__)


def test_help_lists_every_setting():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, check=True).stdout
    for s in SETTINGS:
        assert s.flag in out and s.env in out, s.env


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        ServerConfig().port = 1  # type: ignore[misc]


def test_a_checkpoint_uri_is_accepted_and_checked_at_start_up():
    assert load_config([], {"MODEL_CHECKPOINT": "hf://openai-community/gpt2@main"}).model_checkpoint == \
        "hf://openai-community/gpt2@main"
    assert load_config([], {"MODEL_CHECKPOINT": "s3://models/gpt2/ckpt.pt"}).model_checkpoint.startswith("s3://")
    with pytest.raises(ConfigError) as err:
        load_config([], {"MODEL_CHECKPOINT": "http://models.internal/ckpt.pt"})
    assert err.value.variable == "MODEL_CHECKPOINT" and "NANOGPT_FETCH_ALLOW_HTTP" in err.value.problem
    cfg = load_config([], {"MODEL_CHECKPOINT": "http://models.internal/ckpt.pt", "NANOGPT_FETCH_ALLOW_HTTP": "1"})
    assert cfg.model_checkpoint == "http://models.internal/ckpt.pt"
    with pytest.raises(ConfigError) as err:
        load_config([], {"MODEL_CHECKPOINT": "gs://bucket/ckpt.pt"})
    assert err.value.variable == "MODEL_CHECKPOINT" and "unsupported scheme gs://" in err.value.problem
    with pytest.raises(ConfigError) as err:
        load_config([], {"MODEL_CHECKPOINT": "hf://gpt2", "NANOGPT_FETCH_READ_TIMEOUT": "soon"})
    assert err.value.variable == "NANOGPT_FETCH_READ_TIMEOUT"
