"""Per-request sampling: greedy at temperature 0, else temperature, top-k and top-p (nucleus) with a seeded
generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from services.errors import InvalidRequestError

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_LOGPROBS = 20  # top alternatives per generated token


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default_factory=tuple)  # the output ends before the first of these (not included)
    logprobs: int | None = None  # not None: each generated token's logprob and this many top alternatives

    def validate(self, max_tokens_limit: int) -> None:
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens must lie in [1, {max_tokens_limit}], got {self.max_tokens}", "max_tokens"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature}", "temperature"
            )
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must lie in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}", "top_k")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequestError(f"seed must lie in [0, 2**64), got {self.seed}", "seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}", "stop")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", "stop")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must lie in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")


class Sampler:
    """One per request: holds its generator so a seeded request is reproducible whatever else is in the batch."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] fp32 -> token id."""
        if self.params.temperature == 0:
            return int(torch.argmax(logits))
        return int(torch.multinomial(self.probs(logits), 1, generator=self.generator))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> the distribution [V] fp32 a temperature > 0 draw is made from (temperature, top-k, top-p)."""
        p = self.params
        logits = logits.to(torch.float32).cpu() / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p  # always keeps the first
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return probs
