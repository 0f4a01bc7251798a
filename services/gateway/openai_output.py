"""The OpenAI API's response shapes: completion and chat bodies, their streamed chunks, logprobs and usage.

A token's text in logprobs is its bytes read as UTF-8 (a token holding part of a character reads as U+FFFD,
its `bytes` stay exact); special tokens read as their content.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity: a token of probability 0 gets this (as vLLM does)

# (token id, its logprob (None: the first prompt token), top alternatives (token id, logprob))
LogprobEntry = tuple[int, float | None, list[tuple[int, float]]]


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): every byte is one visible character. Printable Latin-1 bytes stand
    for themselves; the others, in byte order, for the characters from U+0100 on. Character -> byte."""
    visible = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in visible:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


BYTE_LEVEL = _byte_level_alphabet()


class TokenTexts:
    """Token id -> (text, bytes), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.id_to_token(token_id) if self.tokenizer is not None else None
            if piece is None:
                raw = f"token_id:{token_id}".encode()
            elif all(c in BYTE_LEVEL for c in piece):
                raw = bytes(BYTE_LEVEL[c] for c in piece)
            else:  # an added token (BOS, EOS, chat markers): its content
                raw = piece.encode()
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def completion_logprobs(texts: TokenTexts, entries: list[LogprobEntry], offset: int) -> dict:
    """/v1/completions' logprobs; `offset`: characters of the choice's text before the first entry."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in entries:
        text = texts.text(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if logprob is None else _finite(logprob))
        alternatives: dict[str, float] = {}
        for t, v in top:
            alternatives.setdefault(texts.text(t), _finite(v))  # texts can collide (partial characters): keep the best
        out["top_logprobs"].append(alternatives if logprob is not None else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _chat_token(texts: TokenTexts, token: int, logprob: float) -> dict:
    text, raw = texts.get(token)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(raw)}


def chat_logprobs(texts: TokenTexts, entries: list[LogprobEntry]) -> dict:
    return {
        "content": [
            {**_chat_token(texts, token, logprob), "top_logprobs": [_chat_token(texts, t, v) for t, v in top]}
            for token, logprob, top in entries
        ],
        "refusal": None,
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens read from the prefix cache instead of computed."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(obj: dict | str) -> str:
    """One server-sent event: `data: {json}` (or `data: [DONE]`)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass
class ChoiceOutput:
    """A finished choice, for the non-streamed body."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass
class Envelope:
    """What every body and chunk of one HTTP request repeats."""

    id: str
    object: str
    created: int
    model: str

    def body(self, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
