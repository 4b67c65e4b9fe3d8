"""model.fetch.uri (the grammar every entry point accepts) and model.fetch.config (settings from env)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from model.fetch import FetchConfigError, FetchSettings, InvalidSource, is_uri, parse_source
from model.fetch.uri import HF_URI, HTTPS_URI, S3_URI, HfSource, HttpSource, LocalSource, S3Source


@pytest.mark.parametrize("text, expected", [
    ("out/ckpt.pt", LocalSource(Path("out/ckpt.pt"))),
    ("file:///models/ckpt.pt", LocalSource(Path("/models/ckpt.pt"))),
    ("https://example.com/out/ckpt.pt?sig=1", HttpSource("https://example.com/out/ckpt.pt?sig=1")),
    ("s3://my-bucket/out/ckpt.pt", S3Source("my-bucket", "out/ckpt.pt")),
    ("s3://my-bucket/gpt2/", S3Source("my-bucket", "gpt2/")),
    ("hf://openai-community/gpt2", HfSource("openai-community/gpt2", None, "")),
    ("hf://org/repo@v1.0/out/ckpt.pt", HfSource("org/repo", "v1.0", "out/ckpt.pt")),
    ("hf://org/repo@refs%2Fpr%2F1", HfSource("org/repo", "refs/pr/1", "")),
])
def test_sources_parse(text, expected):
    assert parse_source(text) == expected
    assert is_uri(text) is not isinstance(expected, LocalSource)


@pytest.mark.parametrize("text, words", [
    ("http://example.com/ckpt.pt", "NANOGPT_FETCH_ALLOW_HTTP"),
    ("gs://bucket/ckpt.pt", "unsupported scheme gs://"),
    ("pvc://models/out/ckpt.pt", "the operator mounts"),
    ("https://user:pw@example.com/ckpt.pt", "credentials in the URL"),
    ("https://example.com/", "no file path"),
    ("s3://B/ckpt.pt", "not a valid S3 bucket name"),
    ("s3://bucket", "no key"),
    ("hf://gpt2", "expected hf://org/repo"),
    ("hf://org/re--po", "not a valid Hub name"),
    ("hf://org/repo@", "empty revision"),
    ("hf://org/repo/../x", "'..'"),
    ("hf://datasets/org/repo", "only model repos"),
])
def test_invalid_sources_say_why(text, words):
    with pytest.raises(InvalidSource) as err:
        parse_source(text)
    assert words in str(err.value) and isinstance(err.value, ValueError) and err.value.exit_code == 2
    assert "pw" not in str(err.value)


def test_the_display_form_hides_a_presigned_signature():
    assert HttpSource("https://h/x.pt?X-Amz-Signature=secret").display == "https://h/x.pt?…"


def test_names_come_from_the_uri():
    assert parse_source("https://h/out-shakespeare-char/ckpt.pt").name == "out-shakespeare-char"
    assert parse_source("hf://openai-community/gpt2").name == "gpt2"
    assert parse_source("s3://bkt/models/tiny.pt").name == "tiny"


def test_the_exported_patterns_accept_what_the_parser_accepts():
    assert re.fullmatch(HF_URI, "hf://org/repo@main/out/ckpt.pt")
    assert re.fullmatch(S3_URI, "s3://my-bucket/k") and not re.fullmatch(S3_URI, "s3://B/k")
    assert re.fullmatch(HTTPS_URI, "https://example.com:8443/ckpt.pt")


def test_settings_from_the_environment(tmp_path):
    s = FetchSettings.from_env({"NANOGPT_CACHE_DIR": str(tmp_path), "NANOGPT_FETCH_ALLOW_HTTP": "yes",
                                "NANOGPT_FETCH_READ_TIMEOUT": "12.5", "NANOGPT_FETCH_RETRIES": "0",
                                "NANOGPT_S3_ENDPOINT": "http://minio:9000/", "HF_ENDPOINT": "https://hub.local"})
    assert (s.cache_dir, s.allow_http, s.read_timeout_s, s.retries) == (tmp_path, True, 12.5, 0)
    assert s.s3_endpoint == "http://minio:9000" and s.hf_endpoint == "https://hub.local"
    assert FetchSettings.from_env({"XDG_CACHE_HOME": "/xdg"}).cache_dir == Path("/xdg/nanogpt")
    assert FetchSettings.from_env({"HOME": "/home/u"}).cache_dir == Path("/home/u/.cache/nanogpt")
    assert FetchSettings.from_env({"HOME": "/"}).cache_dir == Path("/tmp/nanogpt-cache")  # a uid without a home


@pytest.mark.parametrize("env, value", [
    ("NANOGPT_FETCH_READ_TIMEOUT", "0"), ("NANOGPT_FETCH_RETRIES", "1.5"), ("NANOGPT_FETCH_ALLOW_HTTP", "maybe"),
    ("NANOGPT_S3_ADDRESSING", "dns"), ("NANOGPT_S3_ENDPOINT", "minio:9000"), ("NANOGPT_FETCH_MAX_BYTES", "-1")])
def test_bad_settings_name_the_variable(env, value):
    with pytest.raises(FetchConfigError) as err:
        FetchSettings.from_env({env: value})
    assert err.value.variable == env
