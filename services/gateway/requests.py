"""A request's state as the serving core sees it: prompt, what to do with it, output so far, and its events.

Two kinds: generate (sample up to `params.max_tokens` new tokens) and score (the log-probability of every
prompt token given the ones before, with the top-k alternatives). Front ends create requests and read their
events; the scheduler and the runner change them; nothing else does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry.trace import SpanContext

from services.attention.kv_cache import SequenceBlocks
from services.attention.prefix_index import salted_root
from services.gateway.sampling import Sampler, SamplingParams


@dataclass
class PositionScore:
    token_id: int
    logprob: float | None  # None at position 0
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RequestEvent:
    token_id: int | None = None
    finish_reason: str | None = None  # "length" | "stop" | "scored" on the last event
    error: BaseException | None = None


@dataclass(eq=False)  # a request is itself: the scheduler's lists find it by identity, not by comparing prompts
class Request:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_event: Callable[[RequestEvent], None] | None = None
    score_top_k: int | None = None  # not None: a score request (no new tokens)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    seq: SequenceBlocks = field(default_factory=SequenceBlocks)
    output: list[int] = field(default_factory=list)
    scores: list[PositionScore] = field(default_factory=list)
    # params.logprobs set: per output token, (its logprob, the top alternatives as (token id, logprob), best
    # first); filled by the runner before the token's event, so a front end reads entry i with output token i
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    fed: int = 0  # tokens of `feed` already written to the cache
    # preempted (its blocks taken for older requests): the output so far, written again after the prompt on its
    # way back in (recomputed: the cache holds nothing of it meanwhile)
    recompute: list[int] = field(default_factory=list)
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission (not computed)
    cache_salt: str | None = None  # prefix caching: only requests with the same salt share cached blocks
    # MTP speculative decoding: the tokens the MTP layer proposes to follow output[-1], verified next step, and
    # (temperature > 0) the distributions [k, V] the drafts were drawn from; drafts verified so far and accepted
    draft: list[int] = field(default_factory=list)
    draft_probs: object | None = None
    draft_tokens: int = 0
    accepted_tokens: int = 0
    mtp_paused: bool = False  # no drafts while the batch is above the drafting limit (its MTP cache is still fed)
    finish_reason: str | None = None
    error: BaseException | None = None
    cancelled: bool = False
    span_context: SpanContext | None = None  # the request's trace: steps that serve it link to it
    arrival_time: float = field(default_factory=time.monotonic)  # made by a front end as it arrives (e2e latency)

    def __post_init__(self):
        self.sampler = Sampler(self.params)
        self.seq.root = salted_root(self.cache_salt)

    @property
    def is_score(self) -> bool:
        return self.score_top_k is not None

    @property
    def feed_length(self) -> int:
        """Tokens written before the next one is sampled: the prompt, then what a preemption made it recompute."""
        return len(self.prompt) + len(self.recompute)

    @property
    def feed_left(self) -> int:
        """Tokens of the feed not yet written."""
        return self.feed_length - self.fed

    def feed(self, start: int, n: int) -> list[int]:
        """Tokens start..start+n-1 of the prompt followed by `recompute` (the output so far: `tokens`)."""
        return self.tokens(start, min(start + n, self.feed_length))

    def tokens(self, start: int, stop: int) -> list[int]:
        """The tokens at cache positions start..stop-1: the prompt's, then the output's (a recomputed request's
        feed after the prompt is its output so far)."""
        n = len(self.prompt)
        if stop <= n:
            return self.prompt[start:stop]
        return self.prompt[start:] + self.output[max(0, start - n) : stop - n]

    @property
    def admission_tokens(self) -> int:
        """Cache positions reserved at admission: its feed and (generating) the first new token's; a decode's
        further positions are reserved step by step."""
        return self.feed_length + (0 if self.is_score else 1)

    @property
    def prefilling(self) -> bool:
        return self.fed < self.feed_length

    def preempt(self) -> None:
        """Its blocks were given back: on its way back in it writes the prompt and the output so far again."""
        self.recompute, self.fed = list(self.output), 0
        self.draft, self.draft_probs = [], None
        self.preemptions += 1

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None or self.cancelled

    def emit(self, event: RequestEvent) -> None:
        if self.on_event is not None and not self.cancelled:
            self.on_event(event)
