"""Greedy generation with ONNX Runtime alone, from the decode graph of an ONNX export.

    python -m model export model/demo --format onnx demo-onnx
    python scripts/onnx_generate.py demo-onnx --prompt "The list" --max-new-tokens 60
    python scripts/onnx_generate.py gpt2-onnx --prompt "Hello" --tokenizer gpt2.tiktoken

Needs numpy and onnxruntime (and tiktoken for GPT-2 BPE models): neither torch nor this
project. It follows the server's order of work, so its greedy text is the server's: the
prompt but its last token is prefilled into the cache, that token is decoded alone, then one
token at a time; when block_size positions are in use the context restarts from the last
block_size // 2 tokens (model/generate.py's context_window). Greedy picks the argmax over the
tokenizer's ids (a padded vocabulary's extra ids are never chosen) and stops at end-of-text.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class CharCodec:
    def __init__(self, itos: list[str]):
        self.itos, self.stoi = itos, {c: i for i, c in enumerate(itos)}
        self.n_vocab, self.eot_id = len(itos), None

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)


class BpeCodec:
    def __init__(self, ranks_file: str | None):
        import tiktoken

        if ranks_file is None:
            enc = tiktoken.get_encoding("gpt2")  # tiktoken's cache (TIKTOKEN_CACHE_DIR) or its download
        else:
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in
                     (line.split() for line in Path(ranks_file).read_bytes().splitlines() if line)}
            enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                    special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
        self.enc, self.n_vocab, self.eot_id = enc, enc.n_vocab, 50256

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")


class OnnxGPT:
    """The decode graph and an explicit cache: step(ids) appends ids and returns their logits."""

    def __init__(self, export_dir: str | Path):
        export_dir = Path(export_dir)
        self.meta = json.loads((export_dir / "config.json").read_text())
        graph = self.meta["graphs"]["decode"]
        self.session = ort.InferenceSession(str(export_dir / graph["file"]), providers=["CPUExecutionProvider"])
        cfg = self.meta["model"]
        self.block_size = cfg["block_size"]
        self.shape = (cfg["n_layer"], 1, cfg["n_head"], 0, cfg["n_embd"] // cfg["n_head"])
        self.dtype = NP_DTYPES[self.meta["dtype"]]
        self.reset()

    def reset(self) -> None:
        self.past_k = np.zeros(self.shape, dtype=self.dtype)
        self.past_v = np.zeros(self.shape, dtype=self.dtype)

    @property
    def n_cached(self) -> int:
        return self.past_k.shape[3]

    def step(self, ids: list[int]) -> np.ndarray:
        idx = np.array([ids], dtype=np.int64)
        logits, self.past_k, self.past_v = self.session.run(
            None, {"idx": idx, "past_k": self.past_k, "past_v": self.past_v})
        return logits[0]  # (T, vocab)


def greedy(model: OnnxGPT, codec, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    tokens, out = list(prompt_ids), []
    pending = context_window(tokens, model.block_size)
    model.reset()
    for _ in range(max_new_tokens):
        if len(pending) > 1:
            model.step(pending[:-1])  # prefill: these logits are not needed
        logits = model.step(pending[-1:])[-1]
        token = int(np.argmax(logits[:codec.n_vocab]))
        if token == codec.eot_id:
            break
        out.append(token)
        tokens.append(token)
        if model.n_cached == model.block_size:  # the cache is full: slide, as the server does
            pending = context_window(tokens, model.block_size)
            model.reset()
        else:
            pending = [token]
    return out


def context_window(ids: list[int], block_size: int) -> list[int]:
    return list(ids) if len(ids) <= block_size else list(ids[-max(1, block_size // 2):])


def generate(export_dir: str | Path, prompt: str, max_new_tokens: int, tokenizer: str | None = None) -> str:
    model = OnnxGPT(export_dir)
    spec = model.meta["tokenizer"]
    codec = CharCodec(spec["itos"]) if spec["kind"] == "char" else BpeCodec(tokenizer)
    prompt_ids = codec.encode(prompt) or [codec.eot_id]  # as the server: an empty prompt means <|endoftext|>
    return prompt + codec.decode(greedy(model, codec, prompt_ids, max_new_tokens))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", help="a directory written by `python -m model export ... --format onnx`")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--tokenizer", help="GPT-2 .tiktoken ranks file (default: tiktoken's cache)")
    args = p.parse_args(argv)
    print(generate(args.export_dir, args.prompt, args.max_new_tokens, args.tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
