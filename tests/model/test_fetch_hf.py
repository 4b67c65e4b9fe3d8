"""model.fetch over hf:// through huggingface_hub, against fetch_helpers.HubServer: a loopback stand-in for
the Hub's resolve endpoint (X-Repo-Commit, X-Linked-Etag/-Size, the redirect to a CDN, X-Error-Code)."""

from __future__ import annotations

import hashlib
import json

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from model import load_model_from_checkpoint  # noqa: E402
from model.fetch import AccessDenied, FetchError, FetchSettings, NotFound, Stalled, fetch  # noqa: E402

from fetch_helpers import Fault, HubServer  # noqa: E402
from model_helpers import hf_reference, save_hf, save_nanogpt  # noqa: E402


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("hub")
    ref = hf_reference()
    gpt2 = save_hf(ref, root / "gpt2")
    ckpt = save_nanogpt(ref, root / "nano" / "ckpt.pt")
    return {"org/gpt2-tiny": {p.name: p.read_bytes() for p in gpt2.iterdir()} | {"README.md": b"# tiny"},
            "org/nano": {"out/ckpt.pt": ckpt.read_bytes(), "sharded/config.json": (gpt2 / "config.json").read_bytes(),
                         "sharded/model.safetensors.index.json": json.dumps(
                             {"weight_map": {"a": "model-1.safetensors"}}).encode()}}


@pytest.fixture
def hub(repos, monkeypatch):
    # tests/conftest.py turns huggingface_hub offline for the whole run; this endpoint is loopback.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    with HubServer(repos) as server:
        yield server


@pytest.fixture
def settings(hub, tmp_path) -> FetchSettings:
    return FetchSettings(cache_dir=tmp_path / "cache", hf_endpoint=f"http://127.0.0.1:{hub.port}", retries=1,
                         backoff_s=0.0, read_timeout_s=1.0, progress_interval_s=0.0)


def test_a_gpt2_directory_from_the_repo_root(hub, repos, settings, tmp_path):
    result = fetch("hf://org/gpt2-tiny", tmp_path / "gpt2", settings=settings)
    assert result.is_dir and sorted(f.name for f in result.files) == ["config.json", "model.safetensors"]
    for f in ("config.json", "model.safetensors"):
        assert (tmp_path / "gpt2" / f).read_bytes() == repos["org/gpt2-tiny"][f]
    assert result.provenance == {"hf_repo": "org/gpt2-tiny", "hf_revision": HubServer.COMMIT}
    cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert cdn and all("Authorization" not in r.headers for r in cdn)  # the token stays on the Hub
    assert all(r.headers.get("Authorization") == "Bearer hf_secret_token"
               for r in hub.requests if "/resolve/" in r.path)
    assert all(f"/resolve/{HubServer.COMMIT}/" in r.path for r in hub.requests
               if "/resolve/" in r.path and r.method == "GET")  # every download pinned to one commit
    n = len(hub.gets(cdn[0].path))
    again = fetch("hf://org/gpt2-tiny@main", tmp_path / "gpt2-again", settings=settings)
    assert again.cached and again.sha256 == result.sha256 and len(hub.gets(cdn[0].path)) == n


def test_the_seed_api_loads_an_hf_uri(hub, repos, settings, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_CACHE_DIR", str(settings.cache_dir))
    monkeypatch.setenv("HF_ENDPOINT", settings.hf_endpoint)
    model = load_model_from_checkpoint("hf://org/gpt2-tiny", device="cpu")
    info = model.checkpoint_info
    assert info.format == "huggingface" and info.name == "gpt2-tiny"
    assert info.digest == hashlib.sha256(repos["org/gpt2-tiny"]["model.safetensors"]).hexdigest()
    assert info.source["uri"] == "hf://org/gpt2-tiny" and info.source["hf_revision"] == HubServer.COMMIT
    nano = load_model_from_checkpoint(f"hf://org/nano@{HubServer.COMMIT}/out/ckpt.pt", device="cpu")
    assert nano.checkpoint_info.format == "nanogpt" and nano.checkpoint_info.name == "out"
    for a, b in zip(model.parameters(), nano.parameters()):
        assert a.equal(b)


def test_the_lfs_sha256_is_verified(hub, repos, settings, tmp_path):
    sha = hashlib.sha256(repos["org/nano"]["out/ckpt.pt"]).hexdigest()
    hub.faults[f"cdn/{sha}"].append(Fault("corrupt"))
    with pytest.raises(FetchError, match="the source says " + sha):
        fetch("hf://org/nano/out/ckpt.pt", tmp_path / "ckpt.pt", settings=settings)
    assert not (tmp_path / "ckpt.pt").exists() and not list((settings.cache_dir / "partial").iterdir())
    with pytest.raises(FetchError, match="nothing was downloaded"):
        fetch("hf://org/nano/out/ckpt.pt", tmp_path / "ckpt.pt", sha256="0" * 64, settings=settings)


def test_a_stalled_cdn_download_fails_with_a_clear_error(hub, repos, settings, tmp_path):
    sha = hashlib.sha256(repos["org/nano"]["out/ckpt.pt"]).hexdigest()
    hub.faults[f"cdn/{sha}"] += [Fault("stall", after=1000), Fault("stall")]
    with pytest.raises(Stalled) as err:
        fetch("hf://org/nano/out/ckpt.pt", tmp_path / "ckpt.pt", settings=settings)
    assert str(err.value).startswith(f"hf://org/nano@{HubServer.COMMIT}/out/ckpt.pt: stalled")


@pytest.mark.parametrize("uri, error, words", [
    ("hf://org/missing", NotFound, "no such repository"),
    ("hf://org/gpt2-tiny@v9", NotFound, "no such revision"),
    ("hf://org/gpt2-tiny/nope.pt", NotFound, "neither a file nor a folder with config.json"),
    ("hf://org/nano/sharded", NotFound, "named by the sharded index"),
])
def test_hub_errors_name_the_uri_and_the_cause(hub, settings, tmp_path, uri, error, words):
    with pytest.raises(error) as err:
        fetch(uri, tmp_path / "dest", settings=settings)
    assert words in str(err.value) and str(err.value).startswith("hf://org/")
    assert not (tmp_path / "dest").exists()


def test_a_gated_repo_is_access_denied(hub, settings, tmp_path):
    hub.gated.add("org/gpt2-tiny")
    with pytest.raises(AccessDenied, match="gated"):
        fetch("hf://org/gpt2-tiny", tmp_path / "dest", settings=settings)


def test_offline_mode_is_respected(repos, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FetchError, match="HF_HUB_OFFLINE"):
        fetch("hf://org/gpt2-tiny", tmp_path / "dest",
              settings=FetchSettings(cache_dir=tmp_path / "cache", hf_endpoint="http://127.0.0.1:9", retries=0))
