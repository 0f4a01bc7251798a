"""Stop strings over streamed text: whatever the split into deltas, the released pieces are the text before the
first stop string (which is never released), and without one the whole text once flushed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.format.tokenizer import build_tokenizer
from services.gateway.stop_strings import OutputText, StopStringMatcher


def _expected(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _run(deltas: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stops)
    out = []
    for d in deltas:
        out.append(matcher.feed(d))
        if matcher.stopped:
            break
    out.append(matcher.flush())
    return "".join(out), matcher.stopped


@pytest.mark.parametrize(
    "deltas,stops,text,stopped",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["ab", "c"], ["abc", "b"], "", True),  # the earliest match in the text wins, whatever the split
        (["ab"], ["abc", "b"], "a", True),  # ... and when the text ends before "abc" completes, "b" does
        (["x", "y", "z"], ["yy"], "xyz", False),  # held back while it could start "yy", then released
        (["aa", "ab"], ["aab"], "a", True),  # a stop string that starts inside a held-back tail
        (["END"], ["END"], "", True),
        (["中文", "é", "!"], ["é!"], "中文", True),
        (["no stops"], [], "no stops", False),
        (["\na", "a"], ["a", "\naa"], "", True),  # found by hypothesis: "a" completes first, "\naa" starts first
    ],
)
def test_cases(deltas, stops, text, stopped):
    assert _run(deltas, stops) == (text, stopped)


def test_releases_what_cannot_start_a_stop_string_at_once():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.feed("abc<") == "abc"  # "<" could begin "</s>": held
    assert matcher.feed("x") == "<x"
    assert matcher.feed("</") == ""
    assert matcher.feed("s>tail") == "" and matcher.stopped
    assert matcher.feed("more") == "" and matcher.flush() == ""


@given(
    st.text(alphabet="ab中\n", max_size=30),
    st.lists(st.text(alphabet="ab中\n", min_size=1, max_size=4), max_size=4),
    st.lists(st.integers(0, 30), max_size=8),
)
def test_any_split_gives_the_truncated_text(text, stops, cuts):
    cuts = sorted({min(c, len(text)) for c in cuts})
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert _run(deltas, stops) == _expected(text, stops)


def test_output_text_detokenizes_then_stops():
    tok = build_tokenizer(512)
    ids = tok.encode("Hello, world! naïve café", add_special_tokens=False).ids
    out = OutputText(tok, ["café"])
    pieces = []
    for i, t in enumerate(ids):
        pieces.append(out.step(t, last=i == len(ids) - 1))
        if out.stopped:
            break
    assert "".join(pieces) == "Hello, world! naïve " and out.stopped
    plain = OutputText(tok)
    assert "".join(plain.step(t, last=i == len(ids) - 1) for i, t in enumerate(ids)) == "Hello, world! naïve café"
