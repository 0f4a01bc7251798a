"""Incremental detokenization: text deltas as tokens arrive, always adding up to the whole output's text.

`tokenizers`' DecodeStream holds back a token that ends inside a multi-byte character (byte-level BPE splits
UTF-8 characters over tokens), so no delta carries a broken character. Each step costs O(1), not a decode of
the whole output. At the end, whatever the stream still holds (an incomplete character) is flushed as the
full decode renders it, so the concatenated deltas equal `decode(output)` exactly.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if tokenizer is not None else None
        self._ids: list[int] = []
        self._emitted: list[str] = []

    def step(self, token_id: int) -> str:
        """The text this token completes ("" while a character is still incomplete)."""
        if self._stream is None:
            return ""
        self._ids.append(token_id)
        delta = self._stream.step(self.tokenizer, token_id) or ""
        self._emitted.append(delta)
        return delta

    def finish(self) -> str:
        """What is left so that every delta together equals the full decode of the output."""
        if self._stream is None:
            return ""
        full = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        emitted = "".join(self._emitted)
        if full.startswith(emitted):
            return full[len(emitted) :]
        return ""  # never seen: the stream and the full decode disagree on a prefix; keep what was sent
