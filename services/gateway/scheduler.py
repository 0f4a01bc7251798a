"""Continuous batching as planning: which sequences run in the next step, and how many tokens each.

The scheduler never runs the model. `plan()` admits waiting requests, then lays out one step: every running
decode first (one token each, or 1 + the draft its MTP layer proposed last step, to verify), then prefill chunks
(prompt tokens, first come first served) within the step's token budget. A runner executes the plan; `commit()`
takes its results (the sampled token, or the accepted tokens and the next draft, or position scores) and
finishes requests.

Prefill and decode share steps fairly: while any request decodes, a step carries only as many prefill tokens as
keep its wall time within `max_decode_stall` (4) times a decode-only step, so a long prompt's chunks delay the
running decodes by a stated bound however long its context is; the serving core reports each step's time
(`observe()`) and services/gateway/prefill_budget.py turns the times into the next step's prefill tokens (prompts
that fit whole go first, and where more of them wait than requests decode the bound grows by that ratio: a burst
is not fed a few prompts a step). With no request decoding, prefill takes the whole `max_step_tokens`.

It is the one owner of the latent cache's blocks, given out as they are needed (as vLLM does): a request is
admitted when the cache holds its prompt and its first new token with a watermark to spare (first come first
served; the others wait), and each step reserves the positions its decodes write. When a decode finds the cache
full, its draft is dropped, then the most recently admitted request is preempted: its blocks go back and it
returns to the head of the queue, to write its prompt and output again when blocks free up (recompute) and go
on where it stopped. So a request's max_tokens (by default the rest of the context over HTTP) costs nothing
until it is used. Blocks are given back when a request finishes, fails or is cancelled (at the next plan).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.attention.kv_cache import NO_HIT, PagedLatentCache, PrefixHit, SequenceBlocks
from services.errors import PoolUnavailableError, QueueFullError
from services.gateway.config import (
    DEFAULT_MAX_DECODE_STALL,
    DEFAULT_MAX_RUNNING,
    DEFAULT_MAX_STEP_TOKENS,
    DEFAULT_MAX_WAITING,
    DEFAULT_MTP_MAX_BATCH,
)
from services.gateway.prefill_budget import PrefillBudget
from services.gateway.requests import PositionScore, Request, RequestEvent

log = logging.getLogger(__name__)


@dataclass
class PlannedChunk:
    request: Request
    token_ids: list[int]  # new tokens, at positions request.seq.length, +1, ...
    draft: list[int] = field(default_factory=list)  # MTP: the last len(draft) of token_ids, to verify
    prefill: bool = False  # prompt tokens (not a decode)

    @property
    def completes_prompt(self) -> bool:
        """After this chunk the next token can be sampled (a decode, or the last prefill chunk)."""
        return self.request.fed + len(self.token_ids) >= self.request.feed_length

    @property
    def samples(self) -> bool:
        return self.completes_prompt and not self.request.is_score


@dataclass
class StepPlan:
    chunks: list[PlannedChunk]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


@dataclass
class ChunkResult:
    """What the runner gives back for one chunk of a plan."""

    token: int | None = None  # sampled, when the chunk samples
    scores: list[PositionScore] | None = None  # score requests: the positions this chunk scored
    extra: list[int] = field(default_factory=list)  # MTP: tokens after `token` (the accepted drafts' bonus)
    accepted: int = 0  # MTP: drafts of the chunk accepted (token and the extras but the last are those drafts)
    draft: list[int] = field(default_factory=list)  # MTP: the next proposal, verified next step
    draft_probs: object | None = None  # MTP, temperature > 0: the distributions [k, V] the drafts were drawn from


class Scheduler:
    def __init__(
        self,
        cache: PagedLatentCache,
        eos_token_ids: tuple[int, ...],
        max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS,
        max_running: int = DEFAULT_MAX_RUNNING,
        max_waiting: int = DEFAULT_MAX_WAITING,
        mtp_max_batch: int = DEFAULT_MTP_MAX_BATCH,
        max_decode_stall: float = DEFAULT_MAX_DECODE_STALL,
    ):
        self.cache = cache
        self.prefill_budget = PrefillBudget(max_step_tokens, max_decode_stall)  # prefill beside decodes
        self.mtp_max_batch = mtp_max_batch  # MTP drafting only while at most this many run (0: no limit)
        self.eos_token_ids = eos_token_ids
        self.max_step_tokens = max_step_tokens
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.closed: BaseException | None = None  # set when serving stopped for good: submit refuses
        self.on_finish: Callable[[Request], None] | None = None  # told of every request that leaves (metrics)
        self.draft_tokens = self.accepted_tokens = 0  # MTP drafts verified and accepted, all requests (metrics)
        self.preemptions = 0  # requests whose blocks were taken for older ones (recomputed later)
        self._lock = threading.Lock()
        self._work = threading.Event()

    # ---- from any thread --------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self._lock:
            if self.closed is not None:
                raise PoolUnavailableError("gateway", f"serving stopped: {self.closed}")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFullError(
                    f"{len(self.waiting)} requests are waiting, the limit (--max-waiting): retry later"
                )
            self.waiting.append(request)
        self._work.set()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self._work.set()

    def wake(self) -> None:
        self._work.set()

    def wait_for_work(self, timeout: float) -> None:
        self._work.wait(timeout)
        self._work.clear()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    # ---- on the serving thread ------------------------------------------------------------------------
    def plan(self) -> StepPlan:
        """Admit what fits, then the next step: decodes first, prefill chunks in the budget that is left (while
        requests decode, at most what keeps the step within the decode-stall bound)."""
        self._drop_cancelled()
        self._admit()
        if self.mtp_max_batch:
            self._pause_drafting(len(self.running) > self.mtp_max_batch)
        chunks = [PlannedChunk(r, [r.output[-1]]) for r in self.running if not r.prefilling]
        budget = self.max_step_tokens - len(chunks)
        for chunk in chunks:  # 1 + drafts for a sequence whose last step proposed some, as many as the budget allows
            req = chunk.request
            take = min(len(req.draft), budget, req.params.max_tokens - len(req.output) - 1)
            if take > 0:
                chunk.token_ids, chunk.draft = chunk.token_ids + req.draft[:take], req.draft[:take]
                budget -= take
        chunks = self._reserve_decodes(chunks)
        prompting = [r for r in self.running if r.prefilling]
        for req in prompting:  # what prompts beside them wrote since they were admitted
            self._extend_prefix(req)
        room = self.max_step_tokens - sum(len(c.token_ids) for c in chunks)
        budget = self.prefill_budget.allow(len(chunks), [r.feed_left for r in prompting], room)
        if chunks:  # beside decodes, the prompts that fit whole first (first come first served within each kind)
            prompting.sort(key=lambda r: not self.prefill_budget.short(r.feed_left))
        writing: set[bytes] = set()  # prefix caching: the blocks this step's prefill chunks start by writing
        for req in prompting:
            if budget > 0:
                name = self._next_block(req)
                if name in writing:
                    continue  # an earlier prompt writes the same block now: read from the cache next step
                take = req.feed(req.fed, budget)
                if name is not None and len(take) >= self.cache.block_size:
                    writing.add(name)
                chunks.append(PlannedChunk(req, take, prefill=True))
                budget -= len(take)
        return StepPlan(chunks)

    def observe(self, plan: StepPlan, seconds: float) -> None:
        """The wall time of an executed plan (before its commit): sizes the prefill beside later decodes."""
        prefill = [c for c in plan.chunks if c.prefill]
        self.prefill_budget.observe(len(plan.chunks) - len(prefill), sum(len(c.token_ids) for c in prefill), seconds)

    def commit(self, plan: StepPlan, results: list[ChunkResult]) -> None:
        """Advance each request of an executed plan by its result; finish those that are done."""
        for chunk, result in zip(plan.chunks, results, strict=True):
            req = chunk.request
            self.cache.register(req.seq, req.tokens)  # blocks this step filled, cached for later prompts
            if req.prefilling:
                req.fed += len(chunk.token_ids)
            if result.scores is not None:
                req.scores.extend(result.scores)
            if req.is_score:
                if not req.prefilling:
                    self._finish(req, reason="scored")
                continue
            if result.token is None:
                continue  # mid-prompt chunk: nothing sampled yet
            self._commit_tokens(req, chunk, result)

    def fail(self, plan: StepPlan, error: BaseException) -> None:
        """A step that could not run fails its requests; the others go on."""
        for chunk in plan.chunks:
            self._finish(chunk.request, error=error)

    def close(self, error: BaseException) -> None:
        """The serving loop is gone: every request, running or waiting, fails at once; new ones are refused."""
        with self._lock:
            self.closed = error
            waiting, self.waiting = list(self.waiting), deque()
        for req in list(self.running):
            self._finish(req, error=error)
        for req in waiting:
            req.error = error
            req.emit(RequestEvent(error=error))
            self._told(req)

    # ---- internals -------------------------------------------------------------------------------------
    def _pause_drafting(self, above: bool) -> None:
        """Drafting costs more than it saves in batches above --mtp-max-batch: paused while the batch is that
        large (the MTP layer's cache is still fed), resumed when it is not."""
        changed = [r for r in self.running if r.mtp_paused != above]
        for r in self.running:
            r.mtp_paused = above
            if above:
                r.draft, r.draft_probs = [], None
        if changed:
            log.info(
                "MTP drafting %s for %d requests: %d run at once (--mtp-max-batch %d)",
                "paused" if above else "resumed",
                len(changed),
                len(self.running),
                self.mtp_max_batch,
            )

    def _commit_tokens(self, req: Request, chunk: PlannedChunk, result: ChunkResult) -> None:
        """The step's tokens (1, or up to 1 + drafts with MTP) in order, until the request finishes; then the next
        draft, for a request that goes on."""
        req.draft, req.draft_probs = [], None
        if chunk.draft:
            req.draft_tokens += len(chunk.draft)
            req.accepted_tokens += result.accepted
            self.draft_tokens += len(chunk.draft)
            self.accepted_tokens += result.accepted
        for token in [result.token, *result.extra]:
            self._accept_token(req, token)
            if req.done:
                del req.token_logprobs[len(req.output) :]  # logprobs of tokens after the end are not the output's
                return
        req.draft, req.draft_probs = list(result.draft), result.draft_probs

    def _accept_token(self, req: Request, token: int) -> None:
        req.output.append(token)
        p = req.params
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif len(req.output) >= p.max_tokens:
            reason = "length"
        if reason:
            self._finish(req, reason=reason, token=token)
        else:
            req.emit(RequestEvent(token_id=token))

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req)
        with self._lock:
            dropped = [r for r in self.waiting if r.cancelled]
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for req in dropped:  # never admitted: nothing to give back, but they count (finished_reason abort)
            self._told(req)

    def _admit(self) -> None:
        spare = -(-self.cache.num_blocks // 100)  # a 1% watermark: room for the running decodes' next blocks
        while len(self.running) < self.max_running:
            with self._lock:
                if not self.waiting:
                    return
                req = self.waiting[0]
                hit = self._cached_prefix(req)
                need = hit.unheld + self.cache.blocks_needed(
                    SequenceBlocks(hit.blocks, hit.tokens), req.admission_tokens - hit.tokens
                )
                if need + (spare if self.running else 0) > self.cache.free_blocks:
                    return  # the cache is full: wait for running requests to finish
                self.waiting.popleft()
            if hit.tokens:
                self.cache.adopt(req.seq, hit)
                req.fed = hit.tokens
                if not req.preemptions:
                    req.cached_tokens = hit.tokens
            self.cache.reserve(req.seq, req.admission_tokens - hit.tokens)
            self.running.append(req)

    def _extend_prefix(self, req: Request) -> None:
        """Cached blocks that now hold a prompting request's next tokens (written by a request with the same
        start since this one was admitted) replace the ones it reserved: a burst of prompts with one system
        prompt computes it once, not once per prompt admitted in the same step."""
        if req.is_score:
            return
        gained = self.cache.extend(req.seq, req.tokens, req.feed_length - 1)
        req.fed += gained
        if not req.preemptions:
            req.cached_tokens += gained

    def _next_block(self, req: Request) -> bytes | None:
        """The name of the cache block a prompting request writes next (None: no prefix caching, a score, or not
        a whole cacheable block next)."""
        return None if req.is_score else self.cache.next_name(req.seq, req.tokens, req.feed_length - 1)

    def _cached_prefix(self, req: Request) -> PrefixHit:
        """The cached blocks that hold the start of the request's feed, leaving at least its last token to compute
        (its logits are the first sample's); none for a score request (it needs every position's logits)."""
        if self.cache.prefix is None or req.is_score:
            return NO_HIT
        return self.cache.match(req.tokens(0, req.feed_length - 1), req.seq.root)

    def _reserve_decodes(self, chunks: list[PlannedChunk]) -> list[PlannedChunk]:
        """Positions in the cache for every decode chunk, oldest request first. A full cache costs the chunk its
        draft, then preempts the most recently admitted request (perhaps the chunk's own, which then waits)."""
        kept = []
        for chunk in chunks:
            req = chunk.request
            if req not in self.running:
                continue  # preempted for an older request
            while not self.cache.can_fit(req.seq, len(chunk.token_ids)):
                if chunk.draft:
                    chunk.token_ids, chunk.draft = chunk.token_ids[:1], []
                    continue
                victim = next(r for r in reversed(self.running) if not r.is_score)
                self._preempt(victim)
                if victim is req:
                    break
            else:
                self.cache.reserve(req.seq, len(chunk.token_ids))
                kept.append(chunk)
        return kept

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.cache.release(req.seq)
        req.preempt()
        self.preemptions += 1
        with self._lock:
            self.waiting.appendleft(req)

    def _finish(
        self, req: Request, reason: str | None = None, token: int | None = None, error: BaseException | None = None
    ) -> None:
        req.finish_reason, req.error = reason, error
        if req in self.running:
            self.running.remove(req)
        self.cache.release(req.seq)
        req.emit(RequestEvent(token_id=token, finish_reason=reason, error=error))
        self._told(req)

    def _told(self, req: Request) -> None:
        if self.on_finish is not None:
            self.on_finish(req)
