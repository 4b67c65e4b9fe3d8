"""Checkpoint loading: every format against Hugging Face's GPT-2 as the reference, and every failure."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from model import CheckpointError, KVCache, load_model_from_checkpoint
from model.__main__ import main as cli
from model.checkpoint import file_digest
from model.safe_load import _RestrictedPickleModule, safe_torch_load

from model_helpers import CHARS, hf_reference, save_build_nanogpt, save_hf, save_nanogpt, write_meta_pkl


def greedy_ours(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decode on our KV cache: prefill, then one token per step."""
    cache = KVCache(model.config, 1)
    logits = model.step(torch.tensor([prompt]), torch.tensor([0]), cache, last_only=True)
    out, pos = [], len(prompt)
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model.step(torch.tensor([[out[-1]]]), torch.tensor([pos]), cache)
        pos += 1
    return out


def greedy_reference(ref, prompt: list[int], n: int) -> list[int]:
    """Greedy decode by full recomputation, no cache: the most independent path."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(ref(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def assert_matches_reference(model, ref, vocab_size: int) -> None:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab_size, (3, 20), generator=g)
    ours, theirs = model(idx)[0], ref(idx, use_cache=False).logits
    assert ours.shape == theirs.shape
    assert theirs.std() > 0.5, "reference logits too flat to tell implementations apart"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    prompt = idx[0, :7].tolist()
    assert greedy_ours(model, prompt, 8) == greedy_reference(ref, prompt, 8)


# (name, HF activation, bias, vocab) -> a writer producing that format from the reference.
def _nanogpt(ref, tmp):
    return save_nanogpt(ref, tmp / "out" / "ckpt.pt")


def _nanogpt_char_nobias(ref, tmp):
    write_meta_pkl(tmp / "data" / "shakespeare_char" / "meta.pkl")  # where nanoGPT keeps it
    return save_nanogpt(ref, tmp / "out-shakespeare-char" / "ckpt.pt", bias=False, dataset="shakespeare_char")


def _build_nanogpt(ref, tmp):
    return save_build_nanogpt(ref, tmp / "log" / "model_40000.pt")


CASES = {
    # name: (activation, bias, vocab_size, writer, expected format, tokenizer)
    "nanogpt": ("gelu", True, 50257, _nanogpt, "nanogpt", "gpt2"),
    "nanogpt-char-nobias": ("gelu", False, 65, _nanogpt_char_nobias, "nanogpt", "char"),
    "build-nanogpt": ("gelu_new", True, 50304, _build_nanogpt, "build-nanogpt", "gpt2"),
    "hf-safetensors-tanh": ("gelu_new", True, 50257, lambda r, t: save_hf(r, t / "gpt2"), "huggingface", "gpt2"),
    "hf-safetensors-exact": ("gelu", True, 50257, lambda r, t: save_hf(r, t / "hf"), "huggingface", "gpt2"),
    "hf-bin-unprefixed-stale": ("gelu_new", True, 50257,
                                lambda r, t: save_hf(r, t / "hf", weights="bin", prefixed=False, stale=True),
                                "huggingface", "gpt2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("via_export", [False, True], ids=["direct", "export"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_format_matches_hf_reference(case, via_export, tmp_path):
    activation, bias, vocab, write, fmt, tok_name = CASES[case]
    ref = hf_reference(activation, bias=bias, vocab_size=vocab)
    path = write(ref, tmp_path)
    if via_export:
        assert cli(["-q", "convert", str(path), str(tmp_path / "export")]) == 0
        path, fmt = tmp_path / "export", "export"
    model = load_model_from_checkpoint(path, device="cpu")
    assert model.checkpoint_info.format == fmt
    assert model.tokenizer.name == tok_name
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.config.gelu_approximate == ("tanh" if activation == "gelu_new" else "none")
    assert model.config.bias == bias
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_matches_reference(model, ref, vocab)


def test_checkpoint_info(tmp_path):
    ref = hf_reference("gelu", vocab_size=50257)
    path = save_nanogpt(ref, tmp_path / "out-owt" / "ckpt.pt")
    model = load_model_from_checkpoint(str(path), device="cpu")
    info = model.checkpoint_info
    n_params = sum(p.numel() for p in ref.parameters())  # HF also counts the tied embedding once
    assert (info.path, info.format, info.name) == (str(path), "nanogpt", "out-owt")
    assert info.n_params == n_params and info.n_bytes == 4 * n_params
    assert info.digest == file_digest([path]) and len(info.digest) == 64
    assert info.source["iter_num"] == 5000 and info.source["best_val_loss"] == pytest.approx(1.4697)
    assert info.source["dataset"] == "openwebtext"


def test_rewriting_the_file_does_not_touch_the_loaded_model(tmp_path):
    """nanoGPT's trainer saves over ckpt.pt in place; a model loaded from it (mmap) must own its weights."""
    path = save_nanogpt(hf_reference("gelu", vocab_size=50257), tmp_path / "ckpt.pt")
    model = load_model_from_checkpoint(path, device="cpu")
    before = model.transformer.h[0].attn.c_attn.weight.clone()
    save_nanogpt(hf_reference("gelu", vocab_size=50257, seed=9), path)
    path.write_bytes(path.read_bytes()[:100])  # and truncated: no SIGBUS either
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, before)


def test_build_nanogpt_provenance_and_padded_vocab(tmp_path):
    ref = hf_reference("gelu_new", vocab_size=50304)
    model = load_model_from_checkpoint(save_build_nanogpt(ref, tmp_path / "log" / "model_40000.pt"), device="cpu")
    assert model.config.vocab_size == 50304 and model.tokenizer.n_vocab == 50257
    assert model.checkpoint_info.source == {"format": "build-nanogpt", "step": 40000, "val_loss": 3.07}
    assert model.checkpoint_info.name == "model_40000"


def test_export_keeps_provenance_and_char_tokenizer(tmp_path):
    ref = hf_reference("gelu", bias=False, vocab_size=65)
    src = _nanogpt_char_nobias(ref, tmp_path)
    assert cli(["-q", "convert", str(src), str(tmp_path / "exp")]) == 0
    (tmp_path / "data" / "shakespeare_char" / "meta.pkl").unlink()  # the export needs no meta.pkl
    model = load_model_from_checkpoint(tmp_path / "exp", device="cpu")
    assert model.tokenizer.name == "char" and "".join(model.tokenizer.itos) == CHARS
    src_info = model.checkpoint_info.source
    assert src_info["format"] == "nanogpt" and src_info["iter_num"] == 5000
    assert src_info["digest"] == file_digest([src]) and src_info["name"] == "out-shakespeare-char"


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16", "bf16"])
def test_dtype_choice(dtype, tmp_path):
    ref = hf_reference("gelu", vocab_size=50257)
    model = load_model_from_checkpoint(save_nanogpt(ref, tmp_path / "ckpt.pt"), device="cpu", dtype=dtype)
    want = {"float16": torch.float16}.get(dtype, torch.bfloat16) if isinstance(dtype, str) else dtype
    assert all(p.dtype == want for p in model.parameters())
    assert model.checkpoint_info.n_bytes == 2 * model.checkpoint_info.n_params


def test_bad_dtype_names_the_choices(tmp_path):
    path = save_nanogpt(hf_reference("gelu", vocab_size=50257), tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="dtype must be one of .* got 'float8'"):
        load_model_from_checkpoint(path, device="cpu", dtype="float8")


# --- never run pickled code -------------------------------------------------------------


class Evil:
    """Unpickling this runs a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [Evil, EvilEval])
@pytest.mark.parametrize("allowlist_api", [True, False], ids=["weights_only", "torch<2.4-fallback"])
def test_malicious_checkpoint_refused_and_inert(payload, allowlist_api, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": {}, "config": {"x": payload(marker)}}, path)
    monkeypatch.setattr("model.safe_load.has_allowlist_api", lambda: allowlist_api)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_model_from_checkpoint(path, device="cpu")
    assert str(path) in str(err.value)
    assert ("posix.system" if payload is Evil else "eval") in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("allowlist_api", [True, False], ids=["weights_only", "torch<2.4-fallback"])
def test_allowlist_itself_refuses_what_the_prescan_would(allowlist_api, tmp_path):
    """Even without our pre-scan of the pickle's globals, torch.load never runs the payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    torch.save({"x": Evil(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        if allowlist_api:
            torch.load(str(path), weights_only=True)
        else:
            torch.load(str(path), weights_only=False, pickle_module=_RestrictedPickleModule)
    assert not marker.exists()


def test_malicious_raw_pickle_refused_and_inert(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    path.write_bytes(pickle.dumps({"model": Evil(marker)}, protocol=2))  # a bare pickle, not a torch zip
    with pytest.raises(CheckpointError, match="refused") as err:
        load_model_from_checkpoint(path, device="cpu")
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.slow
def test_foreign_gptconfig_loads_as_plain_object_in_fallback(tmp_path, monkeypatch):
    ref = hf_reference("gelu_new", vocab_size=50304)
    path = save_build_nanogpt(ref, tmp_path / "model_00010.pt")
    obj = safe_torch_load(path, use_allowlist_api=False)
    assert type(obj["config"]).__name__ == "GPTConfig" and obj["config"].n_embd == 64
    monkeypatch.setattr("model.safe_load.has_allowlist_api", lambda: False)
    assert_matches_reference(load_model_from_checkpoint(path, device="cpu"), ref, 50304)


def test_malicious_meta_pkl_refused_and_inert(tmp_path):
    marker = tmp_path / "pwned"
    ref = hf_reference("gelu", bias=False, vocab_size=65)
    path = save_nanogpt(ref, tmp_path / "out" / "ckpt.pt", bias=False, dataset="shakespeare_char")
    (tmp_path / "out" / "meta.pkl").write_bytes(pickle.dumps({"itos": Evil(marker)}))
    with pytest.raises(CheckpointError, match="refused to load global posix.system"):
        load_model_from_checkpoint(path, device="cpu")
    assert not marker.exists()


# --- every bad file gets an error naming the path and the problem ------------------------


def _ckpt(tmp_path, **changes):
    ref = hf_reference("gelu", vocab_size=50257)
    path = save_nanogpt(ref, tmp_path / "ckpt.pt")
    if changes:
        ckpt = torch.load(path, weights_only=True)
        for edit in changes.values():
            edit(ckpt)
        torch.save(ckpt, path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as err:
        load_model_from_checkpoint(tmp_path / "nope.pt")
    assert err.value.path == str(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", b"\x00" * 64])
def test_not_a_checkpoint(content, tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a checkpoint") as err:
        load_model_from_checkpoint(path)
    assert str(path) in str(err.value)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    import zipfile

    path = tmp_path / "ckpt.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match="not a checkpoint: a zip archive without PyTorch's data.pkl"):
        load_model_from_checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file(keep, tmp_path):
    path = _ckpt(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_model_from_checkpoint(path)
    assert str(path) in str(err.value)


def test_truncated_safetensors(tmp_path):
    d = save_hf(hf_reference(), tmp_path / "hf")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_model_from_checkpoint(d)
    assert str(d / "model.safetensors") in str(err.value)


@pytest.mark.parametrize("obj", [{"foo": 1}, [1, 2, 3], {"model": {}, "config": 7}])
def test_unknown_format(obj, tmp_path):
    path = tmp_path / "thing.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="unknown format") as err:
        load_model_from_checkpoint(path)
    assert str(path) in str(err.value)


def test_unknown_directory(tmp_path):
    with pytest.raises(CheckpointError, match="unknown format: a directory without config.json"):
        load_model_from_checkpoint(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    def widen(ckpt):
        ckpt["model"]["_orig_mod.transformer.h.1.mlp.c_fc.weight"] = torch.zeros(200, 64)

    with pytest.raises(CheckpointError, match="shape") as err:
        load_model_from_checkpoint(_ckpt(tmp_path, edit=widen), device="cpu")
    assert err.value.key == "transformer.h.1.mlp.c_fc.weight"
    assert err.value.expected == (256, 64) and err.value.got == (200, 64)
    assert "transformer.h.1.mlp.c_fc.weight" in str(err.value) and "(256, 64)" in str(err.value)


def test_config_disagreeing_with_weights_names_the_tensor(tmp_path):
    def fewer_positions(ckpt):
        ckpt["model_args"]["block_size"] = 32

    with pytest.raises(CheckpointError, match="shape") as err:
        load_model_from_checkpoint(_ckpt(tmp_path, edit=fewer_positions), device="cpu")
    assert err.value.key == "transformer.wpe.weight"


def test_missing_key_named(tmp_path):
    def drop(ckpt):
        del ckpt["model"]["_orig_mod.transformer.h.0.ln_2.bias"]

    with pytest.raises(CheckpointError, match="missing 1 tensor") as err:
        load_model_from_checkpoint(_ckpt(tmp_path, edit=drop), device="cpu")
    assert err.value.key == "transformer.h.0.ln_2.bias"


def test_unexpected_key_named(tmp_path):
    def add(ckpt):
        ckpt["model"]["transformer.h.7.attn.c_attn.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError, match="unexpected") as err:
        load_model_from_checkpoint(_ckpt(tmp_path, edit=add), device="cpu")
    assert err.value.key == "transformer.h.7.attn.c_attn.weight"


def test_untied_embedding_refused(tmp_path):
    def untie(ckpt):
        ckpt["model"]["_orig_mod.lm_head.weight"] = ckpt["model"]["_orig_mod.lm_head.weight"] + 1

    with pytest.raises(CheckpointError, match="untied") as err:
        load_model_from_checkpoint(_ckpt(tmp_path, edit=untie), device="cpu")
    assert err.value.key == "lm_head.weight"


def test_char_model_without_meta_pkl(tmp_path):
    ref = hf_reference("gelu", bias=False, vocab_size=65)
    path = save_nanogpt(ref, tmp_path / "out" / "ckpt.pt", bias=False, dataset="shakespeare_char")
    with pytest.raises(CheckpointError, match="no tokenizer.*meta.pkl") as err:
        load_model_from_checkpoint(path, device="cpu")
    assert str(tmp_path / "out" / "meta.pkl") in str(err.value)
    # An explicit meta.pkl anywhere works.
    meta = write_meta_pkl(tmp_path / "elsewhere" / "meta.pkl")
    model = load_model_from_checkpoint(path, device="cpu", tokenizer_path=meta)
    assert model.tokenizer.encode("ROMEO:") == [CHARS.index(c) for c in "ROMEO:"]


def test_tokenizer_larger_than_model_vocab(tmp_path):
    ref = hf_reference("gelu", bias=False, vocab_size=65)
    path = save_nanogpt(ref, tmp_path / "ckpt.pt", bias=False)
    write_meta_pkl(tmp_path / "meta.pkl", CHARS + "#@%")
    with pytest.raises(CheckpointError, match="more tokens than the model's vocab_size"):
        load_model_from_checkpoint(path, device="cpu")


@pytest.mark.parametrize("field,value,match", [
    ("activation_function", "relu", "unsupported activation_function"),
    ("layer_norm_epsilon", 1e-6, "unsupported layer_norm_epsilon"),
    ("model_type", "llama", "model_type 'llama' is not 'gpt2'"),
    ("tie_word_embeddings", False, "unsupported tie_word_embeddings"),
])
def test_unsupported_hf_config(field, value, match, tmp_path):
    import json

    d = save_hf(hf_reference(), tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match) as err:
        load_model_from_checkpoint(d, device="cpu")
    assert str(d) in str(err.value)


def test_hf_weights_file_path_means_its_directory(tmp_path):
    ref = hf_reference()
    d = save_hf(ref, tmp_path / "gpt2")
    model = load_model_from_checkpoint(d / "model.safetensors", device="cpu")
    assert model.checkpoint_info.format == "huggingface" and model.checkpoint_info.name == "gpt2"


def test_error_str_is_clear():
    err = CheckpointError("/m/ckpt.pt", "tensor shape does not match the model config", "lm_head.weight", (5, 2), (4, 2))
    assert str(err) == "/m/ckpt.pt: tensor shape does not match the model config: lm_head.weight (expected (5, 2), got (4, 2))"
    assert str(CheckpointError("/m", "no such file or directory")) == "/m: no such file or directory"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_dtype_and_device(tmp_path):
    ref = hf_reference("gelu", vocab_size=50257)
    path = save_nanogpt(ref, tmp_path / "ckpt.pt")
    model = load_model_from_checkpoint(path)  # defaults: cuda, bfloat16 (float16 without bf16 support)
    p = next(model.parameters())
    assert p.device.type == "cuda" and p.dtype in (torch.bfloat16, torch.float16)
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        ours = model(idx.cuda())[0].float().cpu()
        want = ref(idx, use_cache=False).logits
    assert (ours - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("field, value, words", [
    ("n_head", 0, "n_head must be >= 1, got 0"),
    ("n_layer", 1.5, "n_layer must be an integer, got 1.5"),
    ("n_embd", True, "n_embd must be an integer"),
])
def test_bad_model_args_name_the_field(field, value, words, tmp_path):
    path = _ckpt(tmp_path, edit=lambda c: c["model_args"].__setitem__(field, value))
    with pytest.raises(CheckpointError, match="invalid model config") as err:
        load_model_from_checkpoint(path, device="cpu")
    assert words in str(err.value)


def test_refusal_names_the_global_and_never_advises_weights_only_false(tmp_path):
    marker = tmp_path / "pwned"
    for protocol in (2, 4):
        path = tmp_path / f"raw{protocol}.pt"
        path.write_bytes(pickle.dumps({"model": Evil(marker)}, protocol=protocol))
        with warnings.catch_warnings(), pytest.raises(CheckpointError, match="refused") as err:
            warnings.simplefilter("ignore")  # torch warns about protocol 4 on some versions
            load_model_from_checkpoint(path, device="cpu")
        message = str(err.value)
        assert "weights_only" not in message and "will likely succeed" not in message
        assert ("global posix.system is not allowed" if protocol == 2 else "pickle opcode FRAME") in message
    assert not marker.exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "link/model.safetensors"])
def test_sharded_index_is_confined_to_the_checkpoint_directory(shard, tmp_path):
    ref = hf_reference("gelu", vocab_size=50257)
    path = save_hf(ref, tmp_path / "hf")
    weights = path / "model.safetensors"
    (tmp_path / "outside.safetensors").write_bytes(weights.read_bytes())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.safetensors").write_bytes(weights.read_bytes())
    (path / "link").symlink_to(tmp_path / "elsewhere")
    weights.unlink()
    (path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"transformer.wte.weight": "%s"}}' % shard)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as err:
        load_model_from_checkpoint(path, device="cpu")
    assert shard in str(err.value)
