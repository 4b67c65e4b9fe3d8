"""`python -m model fetch` as the operator's init container runs it, and URIs through the seed API."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model import load_model_from_checkpoint
from model.checkpoint import file_digest

from fetch_helpers import Fault, FileServer
from model_helpers import hf_reference, save_nanogpt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # GPT-2's vocabulary: a lone ckpt.pt carries no meta.pkl, so its tokenizer is GPT-2 BPE.
    return save_nanogpt(hf_reference(), tmp_path_factory.mktemp("src") / "out-tiny" / "ckpt.pt")


@pytest.fixture
def env(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "NANOGPT_CACHE_DIR": str(tmp_path / "cache"),
            "NANOGPT_FETCH_ALLOW_HTTP": "1", "NANOGPT_FETCH_RETRIES": "1", "NANOGPT_FETCH_BACKOFF": "0",
            "NANOGPT_FETCH_READ_TIMEOUT": "1"}


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model", "fetch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_fetch_cli_prints_json_status_and_writes_the_termination_message(env, tmp_path, monkeypatch, capsys):
    from model.__main__ import main as cli

    data = os.urandom(300_000)
    with FileServer({"out-tiny/ckpt.pt": data}) as server:
        dest, status_file = tmp_path / "models" / "ckpt.pt", tmp_path / "termination-log"
        out = _run([server.url("out-tiny/ckpt.pt"), str(dest), "--sha256", hashlib.sha256(data).hexdigest(),
                    "--status-file", str(status_file)], env)
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]  # stdout is JSON lines only
        assert lines[-1]["phase"] == "Fetched" and lines[-1]["path"] == str(dest)
        assert lines[-1]["sha256"] == hashlib.sha256(data).hexdigest() and lines[-1]["cached"] is False
        assert all(line["phase"] == "Fetching" for line in lines[:-1])
        assert json.loads(status_file.read_text()) == lines[-1]
        assert dest.read_bytes() == data
        for k, v in env.items():  # a restarted pod, in this process (an interpreter start is slow here)
            if k.startswith("NANOGPT_"):
                monkeypatch.setenv(k, v)
        assert cli(["fetch", server.url("out-tiny/ckpt.pt"), str(dest)]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["cached"] is True
        assert len(server.gets("out-tiny/ckpt.pt")) == 1


@pytest.mark.parametrize("case, code, reason", [
    ("missing", 3, "NotFound"), ("forbidden", 4, "Forbidden"), ("corrupt", 6, "DigestMismatch"),
    ("stall", 5, "Stalled"), ("http", 2, "InvalidURI"), ("bad-digest", 2, "InvalidURI")])
def test_fetch_cli_failures_have_an_exit_code_and_a_reason(env, tmp_path, monkeypatch, capsys, case, code, reason):
    from model.__main__ import main as cli

    for k, v in env.items():
        if k.startswith("NANOGPT_"):
            monkeypatch.setenv(k, v)
    data = b"not really a checkpoint" * 1000
    with FileServer({"ckpt.pt": data}) as server:
        url, args = server.url("ckpt.pt"), []
        if case == "missing":
            url = server.url("nope.pt")
        elif case == "forbidden":
            server.head_allowed = False
            server.faults["ckpt.pt"].append(Fault("status", status=403))
        elif case == "corrupt":
            server.faults["ckpt.pt"].append(Fault("corrupt"))
            args = ["--sha256", hashlib.sha256(data).hexdigest()]
        elif case == "stall":
            server.faults["ckpt.pt"] += [Fault("stall", after=10), Fault("stall")]
        elif case == "http":
            monkeypatch.setenv("NANOGPT_FETCH_ALLOW_HTTP", "0")
        elif case == "bad-digest":
            args = ["--sha256", "abc"]
        status_file = tmp_path / "termination-log"
        assert cli(["fetch", url, str(tmp_path / "ckpt.pt"), "--status-file", str(status_file), *args]) == code
    final = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert final["phase"] == "Failed" and final["reason"] == reason
    assert final["message"].startswith(url) and final == json.loads(status_file.read_text())
    assert final["retryable"] is (case == "stall")
    assert not (tmp_path / "ckpt.pt").exists()


def test_seed_api_loads_from_an_http_uri(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NANOGPT_FETCH_ALLOW_HTTP", "1")
    with FileServer({"out-tiny/ckpt.pt": ckpt.read_bytes()}) as server:
        model = load_model_from_checkpoint(server.url("out-tiny/ckpt.pt"), device="cpu")
        again = load_model_from_checkpoint(server.url("out-tiny/ckpt.pt"), device="cpu")
        assert len(server.gets("out-tiny/ckpt.pt")) == 1  # the second load came from the cache
    local = load_model_from_checkpoint(ckpt, device="cpu")
    info = model.checkpoint_info
    assert info.format == "nanogpt" and info.name == "out-tiny" and info.digest == local.checkpoint_info.digest
    assert info.source["uri"] == server.url("out-tiny/ckpt.pt") and info.source["fetched_sha256"] == info.digest
    assert again.checkpoint_info.path == info.path
    for a, b in zip(model.parameters(), local.parameters()):
        assert a.equal(b)


def test_a_fetched_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    """The same safe loader: a pickle naming os.system fails to load, whether local or fetched."""
    import torch

    from model.checkpoint import CheckpointError

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_args": {}, "x": Evil()}, bad, pickle_protocol=2)
    monkeypatch.setenv("NANOGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NANOGPT_FETCH_ALLOW_HTTP", "1")
    with FileServer({"evil.pt": bad.read_bytes()}) as server:
        with pytest.raises(CheckpointError, match="refused"):
            load_model_from_checkpoint(server.url("evil.pt"), device="cpu")
    assert not (tmp_path / "pwned").exists()
