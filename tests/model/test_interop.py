"""`python -m model export`: TorchScript and ONNX artefacts that load, compute the model's logits,
and generate the server's greedy text with ONNX Runtime alone."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import generate_text, load_model_from_checkpoint
from model.__main__ import main as cli
from model.interop import ExportError, export_model
from model.interop import verify

from model_helpers import hf_reference, save_hf

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "model" / "demo"
ort = pytest.importorskip("onnxruntime")


def _onnx_generate():
    spec = importlib.util.spec_from_file_location("onnx_generate", REPO / "scripts" / "onnx_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def demo():
    return load_model_from_checkpoint(DEMO, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory, demo) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "demo-onnx"
    comps = export_model(demo, "onnx", out)
    assert [c.graph for c in comps] == ["forward", "forward", "decode", "decode"]
    assert all(c.ok and c.rel < 1e-4 for c in comps)
    return out


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory) -> Path:
    """A Hugging Face GPT-2 directory with random weights on GPT-2's BPE vocabulary."""
    return save_hf(hf_reference(vocab_size=50257), tmp_path_factory.mktemp("hf") / "gpt2-tiny")


def test_torchscript_round_trip_on_new_shapes(demo, tmp_path):
    out = tmp_path / "demo.pt"
    comps = export_model(demo, "torchscript", out)
    assert all(c.ok and c.rel < 1e-4 and c.argmax_agree == 1.0 for c in comps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.pt"]  # no temporary left behind
    loaded = torch.jit.load(str(out))
    idx = torch.randint(0, demo.config.vocab_size, (4, 17), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = demo(idx)[0]
        assert torch.allclose(loaded(idx), want, rtol=0, atol=1e-4 * want.abs().max())
        # the decode method: 16 tokens of prefill, then the 17th with the cache
        empty = torch.zeros(demo.config.n_layer, 4, demo.config.n_head, 0, demo.config.head_dim)
        _, pk, pv = loaded.decode(idx[:, :16], empty, empty)
        logits, pk, _ = loaded.decode(idx[:, 16:], pk, pv)
        assert pk.shape[3] == 17
        assert torch.allclose(logits[:, -1], want[:, -1], rtol=0, atol=1e-4 * want.abs().max())
    from model.interop.torchscript import read_meta
    meta = read_meta(out)
    assert meta["model"]["n_layer"] == 4 and meta["tokenizer"]["kind"] == "char" and meta["dtype"] == "float32"


def test_torchscript_float16(tmp_path):
    model = load_model_from_checkpoint(DEMO, device="cpu", dtype="float16")
    comps = export_model(model, "torchscript", tmp_path / "demo16.pt")
    assert all(c.dtype == "float16" and c.rel <= verify.TOLERANCE[torch.float16] for c in comps)


def test_onnx_dynamic_axes_in_onnxruntime(demo, demo_onnx):
    meta = json.loads((demo_onnx / "config.json").read_text())
    assert meta["format"] == "nanogpt-k8s-onnx" and meta["graphs"]["decode"]["inputs"] == ["idx", "past_k", "past_v"]
    assert len(meta["verification"]) == 4
    sess = ort.InferenceSession(str(demo_onnx / "model.onnx"), providers=["CPUExecutionProvider"])
    idx = torch.randint(0, demo.config.vocab_size, (5, 30), generator=torch.Generator().manual_seed(3))
    got = sess.run(None, {"idx": idx.numpy()})[0]
    with torch.no_grad():
        want = demo(idx)[0].numpy()
    assert got.shape == (5, 30, demo.config.vocab_size)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_onnx_greedy_text_equals_generate_text_without_torch(demo, demo_onnx):
    # 140 tokens after an 8-character prompt on a 128-position model: the context slides once
    want = generate_text(demo, "The list", max_length=140, temperature=0)
    code = ("import sys, runpy; sys.modules['torch'] = None; "  # importing torch would now fail
            "sys.argv = ['onnx_generate', sys.argv[1], '--prompt', 'The list', '--max-new-tokens', '140']; "
            "runpy.run_path('scripts/onnx_generate.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, str(demo_onnx)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout[:-1] == want  # print's newline


def test_onnx_gpt2_bpe_greedy_equals_generate_text(gpt2_ckpt, tokenizers_dir, tmp_path):
    model = load_model_from_checkpoint(gpt2_ckpt, device="cpu", dtype="float32")
    out = tmp_path / "gpt2-onnx"
    export_model(model, "onnx", out)
    want = generate_text(model, "Hello, my name is", max_length=80, temperature=0)
    got = _onnx_generate().generate(out, "Hello, my name is", 80, tokenizer=str(tokenizers_dir / "gpt2.tiktoken"))
    assert got == want and len(got) > len("Hello, my name is")


def test_cli_prints_the_comparison(tmp_path, capsys):
    out = tmp_path / "demo.pt"
    assert cli(["-q", "export", str(DEMO), "--format", "torchscript", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified against the eager model" in printed and printed.count(" ok\n") == 4
    assert "relative" in printed and "argmax agree" in printed
    assert out.is_file()
    # an existing file is not overwritten without --force
    assert cli(["-q", "export", str(DEMO), "--format", "torchscript", str(out)]) == 1


def test_bfloat16_onnx_is_refused_before_writing_anything(tmp_path):
    model = load_model_from_checkpoint(DEMO, device="cpu", dtype="bfloat16")
    with pytest.raises(ExportError, match="bfloat16"):
        export_model(model, "onnx", tmp_path / "bf16")
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_no_file(demo, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(verify.TOLERANCE, torch.float32, 0.0)  # nothing passes a zero tolerance
    for fmt, name in (("torchscript", "demo.pt"), ("onnx", "demo-onnx")):
        with pytest.raises(ExportError, match="do(es)? not compute the model's logits") as err:
            export_model(demo, fmt, tmp_path / name)
        assert "FAILED (tolerance 0e+00)" in str(err.value)
        assert list(tmp_path.iterdir()) == []  # neither the artefact nor its temporary


def test_unknown_format():
    with pytest.raises(ExportError, match="format must be one of torchscript, onnx"):
        export_model(load_model_from_checkpoint(DEMO, device="cpu"), "tflite", "x")
