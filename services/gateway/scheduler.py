"""Continuous batching: requests join between steps; prefill chunks and decode tokens share a step.

Admission control: a request is admitted only when the paged latent cache can hold its prompt plus max_tokens
(blocks are reserved up front, so a running request never runs out); otherwise it waits, first come first
served. A request whose client goes away is cancelled and its blocks freed at the next step boundary. If a
step fails (an expert pool died), the requests in it fail with the error and the scheduler goes on.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext

from services.attention.batch import SequenceChunk, StepBatch
from services.attention.kv_cache import PagedLatentCache, SequenceBlocks
from services.gateway.model import GatewayModel, run_interleaved
from services.rpc.telemetry import tracer
from services.gateway.sampling import Sampler, SamplingParams

DEFAULT_MAX_STEP_TOKENS = 2048
DEFAULT_MAX_RUNNING = 64


@dataclass
class RequestEvent:
    token_id: int | None = None
    finish_reason: str | None = None  # "length" | "stop" on the last event
    error: BaseException | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[RequestEvent], None] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    seq: SequenceBlocks = field(default_factory=SequenceBlocks)
    output: list[int] = field(default_factory=list)
    fed: int = 0  # prompt tokens already written to the cache
    finish_reason: str | None = None
    error: BaseException | None = None
    cancelled: bool = False
    span_context: SpanContext | None = None  # the request's trace: steps that serve it link to it

    def __post_init__(self):
        self.sampler = Sampler(self.params)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None or self.cancelled

    def next_chunk(self, budget: int) -> list[int]:
        if self.fed < len(self.prompt):
            return self.prompt[self.fed : self.fed + budget]
        return [self.output[-1]]


class Scheduler:
    def __init__(self, model: GatewayModel, cache: PagedLatentCache, eos_token_ids: tuple[int, ...],
                 max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, max_running: int = DEFAULT_MAX_RUNNING,
                 on_step: Callable[[], None] | None = None, micro_batches: int = 1):
        self.model = model
        self.cache = cache
        self.eos_token_ids = eos_token_ids
        self.max_step_tokens = max_step_tokens
        self.max_running = max_running
        self.on_step = on_step  # called before each step (e.g. to switch placement at a step boundary)
        # >1 with remote experts: each step is split into micro-batches whose attention runs while the others'
        # experts are computed on the pools
        self.micro_batches = micro_batches
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._lock = threading.Lock()
        self._work = threading.Event()

    # ---- from any thread --------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self._lock:
            self.waiting.append(request)
        self._work.set()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self._work.set()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the scheduler's thread between steps (work that needs the model and cache alone)."""
        future: Future = Future()
        with self._lock:
            self._calls.append((fn, future))
        self._work.set()
        return future

    def wake(self) -> None:
        self._work.set()

    def wait_for_work(self, timeout: float) -> None:
        self._work.wait(timeout)
        self._work.clear()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- on the scheduler's thread --------------------------------------------------------------------------
    def step(self) -> bool:
        """One step of the model over every running request. Returns whether there was anything to do."""
        did_call = self._run_calls()
        self._drop_cancelled()
        self._admit()
        if not self.running:
            return did_call
        if self.on_step:
            self.on_step()
        budget = self.max_step_tokens
        in_step: list[tuple[Request, list[int]]] = []
        for req in self.running:
            chunk = req.next_chunk(max(1, budget))
            if req.fed < len(req.prompt) and budget <= 0:
                continue  # prefill waits for a later step; decodes always go
            in_step.append((req, chunk))
            budget -= len(chunk)
        try:
            with self._step_span(in_step):
                logits = self._forward(in_step)  # [B, V] in in_step order
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the scheduler
            for req, _ in in_step:
                self._finish(req, error=exc)
            return True
        greedy = logits.argmax(-1).tolist()  # [B]: one call for every greedy request of the step
        for row, (req, chunk) in enumerate(in_step):
            if req.fed < len(req.prompt):
                req.fed += len(chunk)
                if req.fed < len(req.prompt):
                    continue  # mid-prompt chunk: nothing to sample yet
            token = greedy[row] if req.params.temperature == 0 else req.sampler(logits[row])
            req.output.append(token)
            p = req.params
            reason = None
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                reason = "stop"
            elif len(req.output) >= p.max_tokens:
                reason = "length"
            if reason:
                self._finish(req, reason=reason, token=token)
            elif req.on_event:
                req.on_event(RequestEvent(token_id=token))
        return True

    def _forward(self, in_step: list[tuple[Request, list[int]]]) -> torch.Tensor:
        groups = _split_by_tokens(list(range(len(in_step))), [len(c) for _, c in in_step], self.micro_batches)
        stages = []
        for rows in groups:
            batch = StepBatch.build([SequenceChunk(in_step[r][0].seq, in_step[r][1]) for r in rows], self.cache)
            stages.append(self.model.forward_stages(batch.to(self.model.device), self.cache))
        outputs = run_interleaved(stages)
        if len(groups) == 1:
            return outputs[0].cpu()
        logits = torch.empty(len(in_step), outputs[0].shape[-1])
        for rows, out in zip(groups, outputs):
            logits[rows] = out.cpu()
        return logits

    @staticmethod
    def _step_span(in_step: list[tuple[Request, list[int]]]):
        """A step serves several requests: its span is a child of the first traced one and links the others."""
        traced = [req.span_context for req, _ in in_step if req.span_context is not None]
        parent = trace.set_span_in_context(NonRecordingSpan(traced[0])) if traced else None
        span = tracer().start_as_current_span("gateway.step", context=parent, links=[Link(c) for c in traced[1:]])
        return span

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def _run_calls(self) -> bool:
        ran = False
        while True:
            with self._lock:
                if not self._calls:
                    return ran
                fn, future = self._calls.popleft()
            ran = True
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001
                    future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req)
        with self._lock:
            self.waiting = deque(r for r in self.waiting if not r.cancelled)

    def _admit(self) -> None:
        while len(self.running) < self.max_running:
            with self._lock:
                if not self.waiting:
                    return
                req = self.waiting[0]
                total = len(req.prompt) + req.params.max_tokens
                if not self.cache.can_fit(req.seq, total):
                    return  # the cache is full: wait for running requests to finish
                self.waiting.popleft()
            self.cache.reserve(req.seq, total)
            self.running.append(req)

    def _finish(self, req: Request, reason: str | None = None, token: int | None = None,
                error: BaseException | None = None) -> None:
        req.finish_reason, req.error = reason, error
        if req in self.running:
            self.running.remove(req)
        self.cache.release(req.seq)
        if req.on_event and not req.cancelled:
            req.on_event(RequestEvent(token_id=token, finish_reason=reason, error=error))


def _split_by_tokens(rows: list[int], tokens: list[int], parts: int) -> list[list[int]]:
    """Rows dealt into at most `parts` non-empty groups of similar token counts, each keeping row order."""
    parts = max(1, min(parts, len(rows)))
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for r in sorted(rows, key=lambda r: -tokens[r]):
        g = load.index(min(load))
        groups[g].append(r)
        load[g] += tokens[r]
    return [sorted(g) for g in groups if g]
