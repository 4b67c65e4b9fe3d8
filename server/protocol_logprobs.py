"""Logprobs in OpenAI's two response shapes (no I/O, no engine; the tokenizer only decodes).

Completions (the legacy shape lm-eval reads):

    {"tokens": [str], "token_logprobs": [float | null], "top_logprobs": [{str: float} | null],
     "text_offset": [int]}

`top_logprobs[i]` holds the `logprobs` most likely tokens at position i and, as vLLM's
does, the token actually there (so it has N or N+1 entries); with echo the prompt's tokens
come first and the first of them has null (nothing precedes it). `text_offset` is each
token's character offset in the choice's `text`.

Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
with exactly `top_logprobs` alternatives per token.

The values are the log-softmax of the model's raw logits (model/logprobs.py).
"""

from __future__ import annotations

from typing import Sequence

from model.tokenizer import IncrementalDecoder


def completion_logprobs(tokenizer, ids: Sequence[int], entries: Sequence, text_len: int | None = None) -> dict:
    """ids: the tokens the choice's text is made of; entries: a TokenLogprob (or None) for each.
    text_len: cut the tokens that start at or after it (a stop string cut the text there)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    decoder, offset = IncrementalDecoder(tokenizer), 0
    for token, entry in zip(ids, entries):
        if text_len is not None and offset >= text_len:
            break
        offsets.append(offset)
        offset += len(decoder.push([token]))
        tokens.append(tokenizer.decode([token]))
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry.logprob)
        top = {tokenizer.decode([t]): lp for t, lp in entry.top}
        top.setdefault(tokenizer.decode([entry.token]), entry.logprob)
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokenizer, entries: Sequence, n_top: int, text_len: int | None = None) -> dict:
    """The chat shape for the generated tokens' entries (text_len as in completion_logprobs)."""
    content, decoder, offset = [], IncrementalDecoder(tokenizer), 0
    for entry in entries:
        if text_len is not None and offset >= text_len:
            break
        offset += len(decoder.push([entry.token]))
        content.append({**_chat_token(tokenizer, entry.token, entry.logprob),
                        "top_logprobs": [_chat_token(tokenizer, t, lp) for t, lp in entry.top[:n_top]]})
    return {"content": content}


def _chat_token(tokenizer, token: int, logprob: float) -> dict:
    return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.decode_bytes([token]))}
