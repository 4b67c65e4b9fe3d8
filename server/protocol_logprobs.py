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

Streamed, a chunk carries the logprobs of the tokens that start in the text sent so far
(`LogprobCursor`), with `text_offset` counted from the start of the choice's whole text: the
chunks' logprobs put end to end are the non-streamed response's.
"""

from __future__ import annotations

from typing import Sequence

from model.tokenizer import IncrementalDecoder


class LogprobCursor:
    """A choice's tokens with their logprobs, released as its text goes out: each token is given
    at the first text length past its start (so a token whose text is held back, by a stop string
    still being matched or an incomplete UTF-8 character, waits for it)."""

    def __init__(self, tokenizer):
        self._decoder, self._offset = IncrementalDecoder(tokenizer), 0
        self._held: list[tuple[int, int, object]] = []  # (text offset, token, TokenLogprob or None)

    def push(self, ids: Sequence[int], entries: Sequence | None) -> None:
        """ids' tokens, with a TokenLogprob (or None) for each; entries None: None for all."""
        for token, entry in zip(ids, entries if entries is not None else [None] * len(ids)):
            self._held.append((self._offset, token, entry))
            self._offset += len(self._decoder.push([token]))

    def take(self, text_len: int | None) -> list[tuple[int, int, object]]:
        """The held tokens that start before text_len (None: all of them), in order."""
        n = len(self._held) if text_len is None else next(
            (k for k, (offset, _, _) in enumerate(self._held) if offset >= text_len), len(self._held))
        out, self._held = self._held[:n], self._held[n:]
        return out


def completion_shape(tokenizer, taken: Sequence[tuple[int, int, object]]) -> dict:
    """LogprobCursor.take's tokens in the completions shape."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for offset, token, entry in taken:
        offsets.append(offset)
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


def chat_shape(tokenizer, taken: Sequence[tuple[int, int, object]], n_top: int) -> dict:
    """LogprobCursor.take's tokens (all with entries) in the chat shape, n_top alternatives each."""
    return {"content": [{**_chat_token(tokenizer, entry.token, entry.logprob),
                         "top_logprobs": [_chat_token(tokenizer, t, lp) for t, lp in entry.top[:n_top]]}
                        for _, _, entry in taken]}


def completion_logprobs(tokenizer, ids: Sequence[int], entries: Sequence, text_len: int | None = None) -> dict:
    """ids: the tokens the choice's text is made of; entries: a TokenLogprob (or None) for each.
    text_len: cut the tokens that start at or after it (a stop string cut the text there)."""
    cursor = LogprobCursor(tokenizer)
    cursor.push(ids, entries)
    return completion_shape(tokenizer, cursor.take(text_len))


def chat_logprobs(tokenizer, entries: Sequence, n_top: int, text_len: int | None = None) -> dict:
    """The chat shape for the generated tokens' entries (text_len as in completion_logprobs)."""
    cursor = LogprobCursor(tokenizer)
    cursor.push([e.token for e in entries], entries)
    return chat_shape(tokenizer, cursor.take(text_len), n_top)


def _chat_token(tokenizer, token: int, logprob: float) -> dict:
    return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.decode_bytes([token]))}
