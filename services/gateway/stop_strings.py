"""Stop strings over streamed text, shared by every front end.

Text arrives in deltas (from the incremental detokenizer). A stop string can span deltas, so the matcher holds
back the end of the text that could still be the start of a stop string, releases the rest, and once a stop
string appears releases only the text before it (the stop string itself is never part of the output, as in
OpenAI's API) and reports that the request should stop. The released pieces add up to the output truncated
before the first stop string (the earliest occurrence in the text, whatever the split into deltas: a match is
final only once no longer stop string can still begin before it); without one, to the whole output once `flush`
gives back what is held.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.gateway.detokenizer import IncrementalDetokenizer


class StopStringMatcher:
    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._held = ""
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, delta: str) -> str:
        """The text that can be released now. Once a stop string is seen, `stopped` is True and this returns
        the text before it; later calls return ""."""
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        end = min(hits) if hits else len(text)
        start = self._undecided_from(text, end)
        if hits and start == end:  # no longer stop string can still begin before this match
            self.stopped, self._held = True, ""
            return text[:end]
        self._held = text[start:]
        return text[:start]

    def flush(self) -> str:
        """The output ended: what was held back is output after all, up to a stop string it holds."""
        held, self._held = self._held, ""
        if self.stopped:
            return ""
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return held[: min(hits)]
        return held

    def _undecided_from(self, text: str, end: int) -> int:
        """The earliest position before `end` from which the rest of `text` is a proper beginning of some stop
        string (a match may still start there, given more text); `end` when there is none."""
        for k in range(min(len(text), self._longest - 1), len(text) - end, -1):
            tail = text[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self.stops):
                return len(text) - k
        return end


class OutputText:
    """A request's text as its tokens arrive: incremental detokenization, then stop strings. Front ends feed each
    token event and send what comes back; once `stopped`, the request should be cancelled and end with "stop"."""

    def __init__(self, tokenizer, stops: Iterable[str] = ()):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._matcher = StopStringMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    def step(self, token_id: int | None, last: bool = False) -> str:
        """The text to send for this event (`last`: the request's final event)."""
        delta = self._detok.step(token_id) if token_id is not None else ""
        if last:
            delta += self._detok.finish()
        text = self._matcher.feed(delta)
        if last:
            text += self._matcher.flush()
        return text
