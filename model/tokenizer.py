"""Tokenizers behind one small interface: GPT-2 BPE (tiktoken) and nanoGPT's character level.

    Tokenizer             name, n_vocab, eot_id, encode, decode, decode_bytes, spec
    ├── GPT2Tokenizer     tiktoken's GPT-2 BPE, loaded offline when it can be
    └── CharTokenizer     nanoGPT's shakespeare_char-style models (meta.pkl)
    IncrementalDecoder    streaming: turns ids into text without splitting a UTF-8 character

GPT-2's BPE data comes from, in order: an explicit `.tiktoken` ranks file if one is
given, else tiktoken's cache (TIKTOKEN_CACHE_DIR, baked into the server image), else
the network. A failure says which of these were tried and why each failed.
"""

from __future__ import annotations

import base64
import codecs
import os
import pickle
from abc import ABC, abstractmethod
from pathlib import Path

# tiktoken_ext/openai_public.py: GPT-2's split pattern (r50k_base and gpt2 share it).
R50K_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_N_VOCAB = 50257


class TokenizerError(ValueError):
    """A tokenizer could not be loaded, or text/ids it cannot represent were given."""


class Tokenizer(ABC):
    name: str
    n_vocab: int  # ids >= n_vocab are never sampled (padded model vocabularies)
    eot_id: int | None  # generation stops here; None when the tokenizer has no end-of-text

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode_bytes(self, ids: list[int]) -> bytes: ...

    @abstractmethod
    def spec(self) -> dict:
        """What model/export.py stores so the tokenizer can be rebuilt without the original files."""

    def decode(self, ids: list[int]) -> str:
        # A BPE token can end inside a multi-byte character; show it as U+FFFD rather than fail.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < self.n_vocab:
                raise TokenizerError(f"token id {i} is outside {self.name}'s vocabulary (0..{self.n_vocab - 1})")


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"
    eot_id = GPT2_EOT_ID

    def __init__(self, encoding):
        self._enc = encoding
        self.n_vocab = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        # As nanoGPT's sample.py: a literal "<|endoftext|>" in a prompt is the special token.
        return self._enc.encode(text, allowed_special={ENDOFTEXT})

    def decode_bytes(self, ids: list[int]) -> bytes:
        self._check_ids(ids)
        return self._enc.decode_bytes(ids)

    def spec(self) -> dict:
        return {"kind": "gpt2"}


class CharTokenizer(Tokenizer):
    """One token per character: id i is the character itos[i] (nanoGPT's data/*_char/prepare.py)."""

    name = "char"
    eot_id = None

    def __init__(self, itos: list[str]):
        if not itos or not all(isinstance(c, str) for c in itos):
            raise TokenizerError("a character tokenizer needs a non-empty list of strings (itos)")
        self.itos = list(itos)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise TokenizerError("a character tokenizer's itos has duplicate entries")
        self.n_vocab = len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            c = err.args[0]
            raise TokenizerError(
                f"character {c!r} (U+{ord(c):04X}) at position {text.index(c)} is not in this model's "
                f"{self.n_vocab}-character vocabulary"
            ) from None

    def decode_bytes(self, ids: list[int]) -> bytes:
        self._check_ids(ids)
        return "".join(self.itos[i] for i in ids).encode("utf-8")

    def spec(self) -> dict:
        return {"kind": "char", "itos": list(self.itos)}


class IncrementalDecoder:
    """Streams text from token ids: push() returns only complete UTF-8 text and holds
    the bytes of a character split across tokens until the rest arrives."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: list[int]) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """Whatever is held back; an unfinished character becomes U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# --- GPT-2 BPE ---------------------------------------------------------------------------


def _read_ranks_file(path: Path) -> dict[bytes, int]:
    # tiktoken's format: "<base64 token> <rank>" per line. Parsed here rather than with
    # tiktoken.load.load_tiktoken_bpe, which would also copy the file into tiktoken's
    # cache directory (and fail when that directory is read-only, as in our images).
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"line {n} is not '<base64 token> <rank>'") from err
    return ranks


def _gpt2_from_file(path: Path) -> GPT2Tokenizer:
    import tiktoken

    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=R50K_PAT_STR,
        mergeable_ranks=_read_ranks_file(path),
        special_tokens={ENDOFTEXT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_N_VOCAB,  # tiktoken checks the file has exactly GPT-2's ranks
    )
    return GPT2Tokenizer(enc)


def _tiktoken_cache_dir() -> str:
    # Read only to say where tiktoken looked; tiktoken itself reads the same variables.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return f"TIKTOKEN_CACHE_DIR={os.environ['TIKTOKEN_CACHE_DIR']!r}"
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return f"DATA_GYM_CACHE_DIR={os.environ['DATA_GYM_CACHE_DIR']!r}"
    import tempfile

    return f"{os.path.join(tempfile.gettempdir(), 'data-gym-cache')} (TIKTOKEN_CACHE_DIR unset)"


def load_gpt2_tokenizer(ranks_path: str | Path | None = None) -> GPT2Tokenizer:
    """GPT-2 BPE from an explicit ranks file, else tiktoken's cache, else the network."""
    if ranks_path is not None:
        # An explicit file is the user's choice: fail rather than silently use another source.
        try:
            return _gpt2_from_file(Path(ranks_path))
        except Exception as err:  # OSError, bad base64, wrong vocabulary size, ...
            raise TokenizerError(f"GPT-2 BPE: tried file {ranks_path}: {err}") from err

    import tiktoken

    try:
        # get_encoding reads tiktoken's cache first and downloads only when the cache has no usable copy.
        return GPT2Tokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as err:
        raise TokenizerError(
            f"GPT-2 BPE could not be loaded. Tried: cache ({_tiktoken_cache_dir()}): no usable copy; "
            f"network (openaipublic.blob.core.windows.net): {type(err).__name__}: {str(err)[:200]}; "
            "file: none given. Fix: set TIKTOKEN_CACHE_DIR to a cache holding GPT-2's files, "
            "or pass an explicit .tiktoken ranks file."
        ) from err


# --- nanoGPT meta.pkl --------------------------------------------------------------------


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds only what pickle makes without importing anything (dict, list, str, int, ...):
    every global lookup, and so every callable a malicious file could name, is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}: meta.pkl may only hold plain data")


def load_meta_pkl(path: str | Path) -> CharTokenizer:
    """nanoGPT's data/<dataset>/meta.pkl: {"vocab_size": int, "itos": {int: str}, "stoi": {str: int}}."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta = _DataOnlyUnpickler(f).load()
    except OSError as err:
        raise TokenizerError(f"{path}: cannot read meta.pkl: {err}") from err
    except Exception as err:  # UnpicklingError, EOFError, ... from a hostile or broken file
        raise TokenizerError(f"{path}: not a usable meta.pkl: {err}") from err
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))):
        raise TokenizerError(f"{path}: meta.pkl needs 'itos', a dict mapping ids 0..n-1 to characters")
    if meta.get("vocab_size", len(itos)) != len(itos):
        raise TokenizerError(f"{path}: meta.pkl vocab_size {meta['vocab_size']} != {len(itos)} entries in itos")
    try:
        return CharTokenizer([itos[i] for i in range(len(itos))])
    except TokenizerError as err:
        raise TokenizerError(f"{path}: {err}") from None


def load_tokenizer_from_spec(spec: dict, tokenizer_path: str | Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer from Tokenizer.spec() (model/export.py's config.json).
    tokenizer_path: a .tiktoken ranks file for "gpt2", or a meta.pkl that overrides "char"."""
    kind = spec.get("kind")
    if kind == "gpt2":
        return load_gpt2_tokenizer(tokenizer_path)
    if kind == "char":
        if tokenizer_path is not None:
            return load_meta_pkl(tokenizer_path)
        return CharTokenizer(spec.get("itos") or [])
    raise TokenizerError(f"unknown tokenizer kind {kind!r} (expected 'gpt2' or 'char')")
