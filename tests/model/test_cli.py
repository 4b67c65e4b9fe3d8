"""`python -m model info | convert | generate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model import load_model_from_checkpoint
from model.__main__ import main as cli
from model.checkpoint import file_digest

from model_helpers import CHARS, hf_reference, save_nanogpt, write_meta_pkl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory) -> Path:
    """A tiny nanoGPT shakespeare_char-style checkpoint with its meta.pkl where nanoGPT keeps it."""
    root = tmp_path_factory.mktemp("nanogpt")
    write_meta_pkl(root / "data" / "shakespeare_char" / "meta.pkl")
    return save_nanogpt(hf_reference("gelu", bias=False, vocab_size=65), root / "out-shakespeare-char" / "ckpt.pt",
                        bias=False, dataset="shakespeare_char")


@pytest.mark.slow
def test_info_json_as_a_real_subprocess(char_ckpt):
    out = subprocess.run([sys.executable, "-m", "model", "info", str(char_ckpt), "--json"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)  # stdout holds only the report; logs went to stderr
    assert info["format"] == "nanogpt" and info["name"] == "out-shakespeare-char"
    assert info["config"]["n_layer"] == 2 and info["config"]["bias"] is False
    assert info["tokenizer"] == {"name": "char", "n_vocab": 65, "eot_id": None}
    assert info["digest"] == file_digest([char_ckpt])
    assert info["parameters"] > 0 and info["bytes"] == 4 * info["parameters"]
    assert "loaded nanogpt checkpoint" in out.stderr


def test_info_text(char_ckpt, capsys):
    assert cli(["-q", "info", str(char_ckpt)]) == 0
    out = capsys.readouterr().out
    for field in ("format      nanogpt", "parameters  ", "bytes       ", "tokenizer   char (n_vocab 65",
                  "digest      sha256:", "config      block_size=64"):
        assert field in out


def test_info_error_is_one_line_not_a_traceback(tmp_path, caplog):
    assert cli(["info", str(tmp_path / "missing.pt")]) == 1
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage() == f"{tmp_path / 'missing.pt'}: no such file or directory"
    assert record.exc_info is None


def test_convert_then_load(char_ckpt, tmp_path, capsys):
    dst = tmp_path / "shakespeare-char"
    assert cli(["-q", "convert", str(char_ckpt), str(dst)]) == 0
    assert capsys.readouterr().out.strip() == str(dst)
    meta = json.loads((dst / "config.json").read_text())
    assert meta["format"] == "nanogpt-k8s" and meta["tokenizer"]["itos"] == list(CHARS)
    assert meta["source"]["format"] == "nanogpt" and meta["source"]["digest"] == file_digest([char_ckpt])
    model = load_model_from_checkpoint(dst, device="cpu")
    assert model.checkpoint_info.format == "export" and model.checkpoint_info.name == "shakespeare-char"


def test_convert_refuses_non_empty_destination(char_ckpt, tmp_path, caplog):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli(["convert", str(char_ckpt), str(tmp_path)]) == 2
    assert "not empty (use --force" in caplog.text
    assert cli(["-q", "convert", str(char_ckpt), str(tmp_path), "--force"]) == 0


def test_convert_dtype(char_ckpt, tmp_path):
    assert cli(["-q", "convert", str(char_ckpt), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    model = load_model_from_checkpoint(tmp_path / "bf16", device="cpu", dtype="auto")
    assert str(next(model.parameters()).dtype) == "torch.bfloat16"


def test_generate_greedy_is_repeatable(char_ckpt, capsys):
    args = ["-q", "generate", "--checkpoint", str(char_ckpt), "--prompt", "ROMEO:", "--max-length", "20",
            "--temperature", "0", "--device", "cpu"]
    assert cli(args) == 0
    first = capsys.readouterr().out
    assert cli(args) == 0
    assert capsys.readouterr().out == first
    text = first.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20


def test_generate_seeded_sampling_is_repeatable(char_ckpt, capsys):
    args = ["-q", "generate", "--checkpoint", str(char_ckpt), "--prompt", "A", "--max-length", "15",
            "--seed", "7", "--top-k", "10", "--top-p", "0.9", "--device", "cpu", "--dtype", "float32"]
    outs = []
    for _ in range(2):
        assert cli(args) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("A")


def test_generate_unknown_character(char_ckpt, caplog):
    assert cli(["generate", "--checkpoint", str(char_ckpt), "--prompt", "hi @you", "--device", "cpu"]) == 1
    assert "character '@' (U+0040) at position 3" in caplog.text
