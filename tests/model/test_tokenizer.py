"""Tokenizers: GPT-2 BPE offline (cache, explicit file, clear failure), char models, streaming decode."""

from __future__ import annotations

import pickle

import pytest
import tiktoken
import tiktoken.registry

from model.tokenizer import (
    R50K_PAT_STR, CharTokenizer, IncrementalDecoder, TokenizerError, load_gpt2_tokenizer, load_meta_pkl,
    load_tokenizer_from_spec,
)

from model_helpers import CHARS, write_meta_pkl


def test_gpt2_from_cache_round_trip():
    tok = load_gpt2_tokenizer()  # TIKTOKEN_CACHE_DIR is set by tests/conftest.py
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.name, tok.n_vocab, tok.eot_id) == ("gpt2", 50257, 50256)
    text = "Héllo wörld, 你好 😀 <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>") == [50256]  # as nanoGPT's sample.py encodes prompts
    assert tok.spec() == {"kind": "gpt2"}


def test_gpt2_from_explicit_ranks_file(tokenizers_dir):
    tok = load_gpt2_tokenizer(tokenizers_dir / "gpt2.tiktoken")
    ref = load_gpt2_tokenizer()
    text = "The quick brown fox's 3 jumps\n\n  over   the lazy dog <|endoftext|> 😀"
    assert tok.encode(text) == ref.encode(text)
    assert (tok.n_vocab, tok.eot_id) == (50257, 50256)


def test_our_split_pattern_is_tiktokens():
    assert tiktoken.get_encoding("gpt2")._pat_str == R50K_PAT_STR


def test_matches_hugging_face_gpt2_tokenizer(tokenizers_dir):
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(tokenizers_dir))  # vocab.json + merges.txt, offline
    text = "It's 2024: naïve café-goers don't   count 12345 tokens!\n\tOK?"
    assert load_gpt2_tokenizer().encode(text) == hf.encode(text)


def test_bad_ranks_file_names_the_file(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(TokenizerError, match=f"tried file {bad}"):
        load_gpt2_tokenizer(bad)
    with pytest.raises(TokenizerError, match="tried file .*missing.tiktoken"):
        load_gpt2_tokenizer(tmp_path / "missing.tiktoken")


def test_missing_cache_says_what_was_tried(tmp_path, monkeypatch):
    """No cached copy and no network: the error names the cache dir, the network failure, and the fix."""
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded by earlier tests
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))

    def no_network(blobpath):
        raise ConnectionError(f"network disabled in this test ({blobpath})")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(TokenizerError) as err:
        load_gpt2_tokenizer()
    msg = str(err.value)
    assert f"cache (TIKTOKEN_CACHE_DIR='{tmp_path / 'empty-cache'}')" in msg
    assert "network" in msg and "network disabled in this test" in msg
    assert "file: none given" in msg


def test_char_tokenizer_round_trip_and_unknown_character():
    tok = CharTokenizer(list(CHARS))
    assert tok.decode(tok.encode("ROMEO:\nHello!")) == "ROMEO:\nHello!"
    assert (tok.n_vocab, tok.eot_id, tok.name) == (65, None, "char")
    with pytest.raises(TokenizerError, match=r"character '@' \(U\+0040\) at position 5"):
        tok.encode("Hello@world")
    with pytest.raises(TokenizerError, match="outside char's vocabulary"):
        tok.decode([3, 65])


def test_meta_pkl(tmp_path):
    tok = load_meta_pkl(write_meta_pkl(tmp_path / "meta.pkl"))
    assert tok.itos == list(CHARS)
    assert load_tokenizer_from_spec(tok.spec()).encode("abc") == tok.encode("abc")


def test_meta_pkl_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "stoi": Evil()}))
    with pytest.raises(TokenizerError, match="refused to load global"):
        load_meta_pkl(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("meta,match", [
    ({"vocab_size": 3, "itos": {0: "a", 2: "b"}}, "ids 0..n-1"),
    ({"vocab_size": 5, "itos": {0: "a", 1: "b"}}, "vocab_size 5 != 2"),
    (["not", "a", "dict"], "needs 'itos'"),
])
def test_bad_meta_pkl(meta, match, tmp_path):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(meta))
    with pytest.raises(TokenizerError, match=match):
        load_meta_pkl(path)


def test_incremental_decoder_holds_partial_utf8():
    tok = load_gpt2_tokenizer()
    text = "naïve 😀 ok 你好"
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push([i]) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # a split emoji is held, not shown broken
    # A character cut off at the end becomes U+FFFD only when flushed.
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    dec = IncrementalDecoder(tok)
    assert dec.push(emoji[:1]) == "" and dec.flush() == "\ufffd"


def test_unknown_spec_kind():
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer_from_spec({"kind": "sentencepiece"})
