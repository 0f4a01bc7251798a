"""The requests one HTTP call makes (n per prompt), submitted together, their events merged as they arrive.

Each choice is a `Request` of the serving core; its events come from the serving thread through
`loop.call_soon_threadsafe` into one asyncio queue (as the gRPC servicer does). Text goes through the shared
`OutputText` (incremental detokenization, then stop strings); a choice that meets a stop string is cancelled
in the core at once, so its cache is freed. Whatever ends the run early (the client going away, an error)
cancels every request still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.gateway.openai_output import LogprobEntry
from services.gateway.requests import Request
from services.gateway.serving import ServingCore
from services.gateway.stop_strings import OutputText
from services.rpc.metrics import GatewayMetrics
from services.rpc.telemetry import tracer


@dataclass
class Choice:
    index: int
    prompt: list[int]
    request: Request | None  # None: nothing to generate (echo with max_tokens 0)
    text: OutputText
    echo_text: str = ""
    echo_logprobs: list[LogprobEntry] = field(default_factory=list)
    tokens: int = 0  # generated tokens received
    finish_reason: str | None = None
    logprob_offset: int = 0  # characters of the choice's text before its next logprob entry (completions)


@dataclass
class Update:
    choice: Choice
    text: str
    token_ids: list[int]
    logprobs: list[LogprobEntry]
    finish_reason: str | None


class ChoiceRun:
    def __init__(self, core: ServingCore, choices: list[Choice], metrics: GatewayMetrics | None = None):
        self.core, self.choices, self.metrics = core, choices, metrics
        self._queue: asyncio.Queue = asyncio.Queue()
        self._span = tracer().start_span("gateway.http_request")
        self._span.set_attribute("expertmesh.choices", len(choices))
        self._submitted: list[Request] = []
        self._arrived = time.monotonic()
        self._last: dict[int, float] = {}

    def start(self) -> None:
        """Submit every request (all were checked before): a full queue refuses the whole call."""
        loop = asyncio.get_running_loop()
        for choice in self.choices:
            req = choice.request
            if req is None:
                continue
            req.span_context = self._span.get_span_context()
            req.on_event = lambda ev, i=choice.index: loop.call_soon_threadsafe(self._queue.put_nowait, (i, ev))
            try:
                self.core.submit(req)
            except BaseException:
                self.cancel()
                raise
            self._submitted.append(req)

    async def updates(self) -> AsyncIterator[Update]:
        """Each choice's updates until every choice has finished; a request's error is raised."""
        try:
            for choice in self.choices:
                if choice.request is None:
                    choice.finish_reason = "length"
                    yield Update(choice, "", [], [], "length")
            pending = sum(1 for c in self.choices if c.finish_reason is None)
            while pending:
                index, ev = await self._queue.get()
                choice = self.choices[index]
                if choice.finish_reason is not None:
                    continue  # events that were on their way when a stop string cancelled the request
                if ev.error is not None:
                    raise ev.error
                update = self._advance(choice, ev)
                if update.finish_reason is not None:
                    pending -= 1
                    if choice.text.stopped:
                        self.core.cancel(choice.request)
                yield update
        finally:
            self.cancel()

    def _advance(self, choice: Choice, ev) -> Update:
        tokens = [] if ev.token_id is None else [ev.token_id]
        logprobs: list[LogprobEntry] = []
        req = choice.request
        if tokens:
            self._observe(choice.index)
            if req.params.logprobs is not None and choice.tokens < len(req.token_logprobs):
                logprob, top = req.token_logprobs[choice.tokens]
                logprobs.append((ev.token_id, logprob, top))
            choice.tokens += 1
        text = choice.text.step(ev.token_id, last=ev.finish_reason is not None)
        finish = "stop" if choice.text.stopped else ev.finish_reason
        choice.finish_reason = finish
        return Update(choice, text, tokens, logprobs, finish)

    def _observe(self, index: int) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            last = self._last.get(index)
            (self.metrics.ttft if last is None else self.metrics.itl).observe(now - (last or self._arrived))
        self._last[index] = now

    def cancel(self) -> None:
        """Cancel what still runs (idempotent)."""
        for req in self._submitted:
            if not req.done:
                self.core.cancel(req)
        if self._span.is_recording():
            self._span.end()

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache: per prompt, the most that any of its n choices found (the
        usage counts each prompt once)."""
        found: dict[int, int] = {}
        for c in self.choices:
            if c.request is not None:
                found[id(c.prompt)] = max(found.get(id(c.prompt), 0), c.request.cached_tokens)
        return sum(found.values())


async def finished(core: ServingCore, req: Request) -> Request:
    """Submit one request (a score) and wait until it has finished; its error is raised."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def on_event(ev) -> None:
        if ev.error is not None or ev.finish_reason:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(ev))

    req.on_event = on_event
    core.submit(req)
    try:
        ev = await done
    finally:
        if not req.done:
            core.cancel(req)
    if ev.error is not None:
        raise ev.error
    return req
