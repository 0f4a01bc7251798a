"""The decode-stall bound: how many prefill tokens a step may carry while requests decode.

A prefill chunk rides in the same step as the running decodes, so every decode waits for it. At long context a
prompt token costs a good part of a whole decode step (its attention reads every earlier key: BENCHMARKS.md,
long prompts, for the tiny preset at 16K context), so no fixed token budget bounds the stall. The budget is
therefore kept in time: a step with decodes may last at most `max_decode_stall` times a decode-only step. The
scheduler reports every executed step's wall time; from the recent decode-only steps (the median of the last
few) and the last mixed step (its prefill tokens, and the time they added over a decode-only step) the next
step's prefill tokens are scaled to fill AIM of the allowed time (a margin for the steps that run slower than
the estimate), growing at most 2x a step.
When no decode-only step was timed in the last REFERENCE_EVERY mixed steps (or ever), the next step runs the
decodes alone to time them. Without decodes, prefill takes the whole step budget (--max-step-tokens).

Short prompts weigh against the decodes: a prompt whose rest fits whole in what the bound lets in (`short`)
is fed before the long ones, and when more short prompts wait than requests decode, the allowed stall grows by
their ratio (short prompting / decoding). A burst of 31 short prompts arriving while one request decodes goes in
at the next step, as vLLM's token budget would take it, instead of a few prompts a step: one longer stall for the
one decode, not twenty, and the burst's last first token seconds earlier. Long prompts never grow the bound: one
or eight 16K prompts beside a decode are fed at the bound's pace.
"""

from __future__ import annotations

import statistics
from collections import deque

REFERENCE_EVERY = 64  # mixed steps between two decode-only steps that time the decodes alone
# the share of the allowed time the budget aims to fill: step times scatter around the estimate (a shared CPU,
# a cost not quite linear in tokens), and the bound is meant for the slow steps too, not only the median
AIM = 0.8


class PrefillBudget:
    def __init__(self, max_step_tokens: int, max_decode_stall: float):
        self.max_step_tokens = max_step_tokens
        self.max_decode_stall = max_decode_stall  # 0: off (prefill always takes what the decodes leave)
        self.tokens = max(1, max_step_tokens // 16)  # prefill tokens beside decodes, until measured
        self._decode_s: deque[float] = deque(maxlen=3)  # wall times of the latest decode-only steps
        self._mixed_steps = 0  # since the last decode-only step

    def short(self, left: int) -> bool:
        """Whether a prompt with `left` tokens still to feed fits whole in what the bound lets in beside decodes."""
        return left <= self.tokens

    def allow(self, decoding: int, left: list[int], budget: int) -> int:
        """Prefill tokens the next step may carry, out of `budget` (the step's tokens the decodes left), beside
        `decoding` decode chunks, for the prompts with `left` tokens still to feed."""
        if not decoding or not self.max_decode_stall:
            return budget
        if not self._decode_s or self._mixed_steps >= REFERENCE_EVERY:
            return 0  # time the decodes alone first
        short = sum(1 for n in left if self.short(n))
        return min(budget, self.tokens * max(1, short // decoding))

    def observe(self, decodes: int, prefill_tokens: int, seconds: float) -> None:
        """An executed step: its decode chunks, its prefill tokens and its wall time."""
        if not self.max_decode_stall or not decodes:
            return
        if not prefill_tokens:
            self._decode_s.append(seconds)
            self._mixed_steps = 0
            return
        self._mixed_steps += 1
        if not self._decode_s:
            return
        decode_s = statistics.median(self._decode_s)
        allowed = AIM * (self.max_decode_stall - 1) * decode_s  # time the prefill may add to a decode step
        added = max(seconds - decode_s, 1e-6)
        fit = int(prefill_tokens * allowed / added)
        self.tokens = max(1, min(fit, 2 * self.tokens, self.max_step_tokens))  # at ratio 1
