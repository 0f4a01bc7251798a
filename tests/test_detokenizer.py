"""Streaming text: the deltas of an incremental detokenizer add up to the full decode, for non-ASCII and
byte-fallback output (multi-byte characters split over tokens), also when the output stops mid-character."""

from __future__ import annotations

import pytest

from services.format.tokenizer import build_tokenizer
from services.gateway.detokenizer import IncrementalDetokenizer

TEXTS = ["ok 中文 é", "Hello, world! 🎉 naïve café", "ünïcödé ✓ — “quotes” 日本語のテキスト", "plain ascii"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(512)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text).ids
    for cut in range(1, len(ids) + 1):  # every prefix: outputs can stop anywhere, mid-character too
        detok = IncrementalDetokenizer(tokenizer)
        deltas = [detok.step(t) for t in ids[:cut]]
        assert all("\ufffd" not in d for d in deltas)  # no broken character is ever streamed
        assert "".join(deltas) + detok.finish() == tokenizer.decode(ids[:cut], skip_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_a_model_without_tokenizer_streams_no_text():
    detok = IncrementalDetokenizer(None)
    assert detok.step(5) == "" and detok.finish() == ""
