"""model.fetch over s3:// against moto's S3 server, a real HTTP server on loopback, through boto3."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from model import load_model_from_checkpoint  # noqa: E402
from model.fetch import FetchSettings, NotFound, VerificationFailed, fetch  # noqa: E402
from model.checkpoint import file_digest  # noqa: E402
from model.fetch.cache import ref_key  # noqa: E402

from model_helpers import hf_reference, save_hf  # noqa: E402

DATA = os.urandom(600_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """A client for setting up objects, and credentials in the standard variables for the code under test."""
    import boto3

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"models-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="out/ckpt.pt", Body=DATA, ChecksumAlgorithm="SHA256")
    return client, bucket


@pytest.fixture
def settings(s3_endpoint, tmp_path) -> FetchSettings:
    return FetchSettings(cache_dir=tmp_path / "cache", s3_endpoint=s3_endpoint, retries=1, backoff_s=0.0,
                         read_timeout_s=5, progress_interval_s=0.0)


def test_fetch_an_object_and_reuse_the_cache(s3, settings, tmp_path):
    _, bucket = s3
    first = fetch(f"s3://{bucket}/out/ckpt.pt", tmp_path / "a.pt", sha256=SHA, settings=settings)
    assert (tmp_path / "a.pt").read_bytes() == DATA and first.sha256 == SHA and not first.cached
    assert first.name == "out"
    second = fetch(f"s3://{bucket}/out/ckpt.pt", tmp_path / "b.pt", settings=settings)
    assert second.cached and second.status()["downloaded_bytes"] == 0
    assert os.path.samefile(tmp_path / "a.pt", tmp_path / "b.pt")


def _partial(s3, settings, data: bytes) -> tuple[str, Path]:
    """out/ckpt.pt's URI, and its partial download in the cache holding `data` (as an interrupted fetch leaves it)."""
    client, bucket = s3
    uri = f"s3://{bucket}/out/ckpt.pt"
    head = client.head_object(Bucket=bucket, Key="out/ckpt.pt")
    partial = settings.cache_dir / "partial" / ref_key(uri, head["ETag"], len(DATA))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)
    return uri, partial


def test_the_stores_own_sha256_is_verified(s3, settings, tmp_path):
    """A partial whose bytes differ from the object: the store's ChecksumSHA256 catches it, it is removed."""
    uri, partial = _partial(s3, settings, b"\0" * 1000)  # what a crash on a bad disk could leave
    with pytest.raises(VerificationFailed, match="the source says"):
        fetch(uri, tmp_path / "ckpt.pt", settings=settings)
    assert not partial.exists() and not (tmp_path / "ckpt.pt").exists()


def test_a_partial_is_resumed_with_a_range(s3, settings, tmp_path):
    uri, _ = _partial(s3, settings, DATA[:250_000])
    result = fetch(uri, tmp_path / "ckpt.pt", sha256=SHA, settings=settings)
    assert (tmp_path / "ckpt.pt").read_bytes() == DATA
    assert result.status()["downloaded_bytes"] == len(DATA) - 250_000


def test_missing_key_and_bucket_are_not_found(s3, settings, tmp_path):
    _, bucket = s3
    with pytest.raises(NotFound) as err:
        fetch(f"s3://{bucket}/nope.pt", tmp_path / "x.pt", settings=settings)
    assert str(err.value).startswith(f"s3://{bucket}/nope.pt: S3 answered")
    with pytest.raises(NotFound):
        fetch("s3://no-such-bucket-here/ckpt.pt", tmp_path / "x.pt", settings=settings)
    with pytest.raises(NotFound, match="no objects under this prefix"):
        fetch(f"s3://{bucket}/empty/", tmp_path / "x", settings=settings)
    assert not (tmp_path / "x.pt").exists()


def test_a_hugging_face_directory_under_a_prefix_loads(s3, settings, tmp_path, monkeypatch):
    client, bucket = s3
    src = save_hf(hf_reference(), tmp_path / "gpt2-tiny")
    for f in src.iterdir():
        client.upload_file(str(f), bucket, f"gpt2-tiny/{f.name}")
    monkeypatch.setenv("NANOGPT_CACHE_DIR", str(settings.cache_dir))
    monkeypatch.setenv("NANOGPT_S3_ENDPOINT", settings.s3_endpoint)
    model = load_model_from_checkpoint(f"s3://{bucket}/gpt2-tiny/", device="cpu")
    assert model.checkpoint_info.format == "huggingface" and model.checkpoint_info.name == "gpt2-tiny"
    assert model.checkpoint_info.digest == file_digest([src / "model.safetensors"])
    result = fetch(f"s3://{bucket}/gpt2-tiny/", tmp_path / "dest", settings=settings)
    assert result.is_dir and result.cached and sorted(p.name for p in (tmp_path / "dest").iterdir()) == \
        sorted(p.name for p in src.iterdir())


def test_a_partial_longer_than_the_object_starts_over(s3, settings, tmp_path):
    client, bucket = s3
    uri = f"s3://{bucket}/out/ckpt.pt"
    head = client.head_object(Bucket=bucket, Key="out/ckpt.pt")
    partial = settings.cache_dir / "partial" / ref_key(uri, head["ETag"], len(DATA))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(DATA + b"junk")
    fetch(uri, tmp_path / "ckpt.pt", sha256=SHA, settings=settings)
    assert (tmp_path / "ckpt.pt").read_bytes() == DATA
