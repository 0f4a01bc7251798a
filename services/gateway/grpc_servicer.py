"""GatewayService over gRPC: transport only. Requests in (checked by the serving core), events out."""

from __future__ import annotations

import asyncio
import time

from expertmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.errors import InvalidRequestError, PoolUnavailableError
from services.gateway.requests import Request
from services.gateway.sampling import SamplingParams
from services.gateway.serving import ServingCore
from services.gateway.stop_strings import OutputText
from services.rpc import grpc_status
from services.rpc.metrics import GatewayMetrics
from services.rpc.telemetry import tracer

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


def sampling_params(s: gateway_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        stop=tuple(s.stop),
        logprobs=s.logprobs if s.HasField("logprobs") else None,
    )


def _logprobs(req: Request, index: int) -> list[gateway_pb2.SampledLogprob]:
    """The logprob entry of output token `index`, when the request asked for logprobs."""
    if req.params.logprobs is None or index >= len(req.token_logprobs):
        return []
    logprob, top = req.token_logprobs[index]
    return [
        gateway_pb2.SampledLogprob(
            logprob=logprob, top=[gateway_pb2.TokenLogprob(token_id=t, logprob=v) for t, v in top]
        )
    ]


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Serves once `core` is set (the server reports NOT_SERVING until then)."""

    def __init__(self, model_info: gateway_pb2.GetModelInfoResponse, metrics: GatewayMetrics | None = None):
        self._core: ServingCore | None = None
        self.model_info = model_info
        self.metrics = metrics

    @property
    def core(self) -> ServingCore:
        if self._core is None:
            raise PoolUnavailableError("gateway", "still loading the model")
        return self._core

    def attach(self, core: ServingCore) -> None:
        self._core = core
        self.model_info.max_context = core.max_context

    def _prompt(self, text: str, token_ids) -> list[int]:
        if text and token_ids:
            raise InvalidRequestError("give text or token_ids, not both")
        if text:
            return self.core.encode(text)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        return list(token_ids)

    async def _events(self, req: Request):
        """Submit `req` and yield its events until the last; a client that goes away cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.on_event = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        self.core.submit(req)
        try:
            while True:
                ev = await events.get()
                if ev.error is not None:
                    raise ev.error
                yield ev
                if ev.finish_reason:
                    return
        finally:
            if not req.done:  # the client went away (or the stream failed): free its cache
                self.core.cancel(req)

    @grpc_status.stream
    async def Generate(self, request, context):
        prompt = self._prompt(request.text, request.token_ids)
        params = sampling_params(request.sampling)
        self.core.check_request(prompt, params)
        with tracer().start_as_current_span("gateway.request") as span:
            span.set_attribute("expertmesh.prompt_tokens", len(prompt))
            req = Request(prompt, params, span_context=span.get_span_context(), cache_salt=request.cache_salt or None)
            yield gateway_pb2.GenerateResponse(prompt_token_ids=prompt)
            text = OutputText(self.core.tokenizer, params.stop)
            last = arrived = time.monotonic()
            count = 0
            async for ev in self._events(req):
                now = time.monotonic()
                if self.metrics and ev.token_id is not None:
                    (self.metrics.ttft if last == arrived else self.metrics.itl).observe(now - last)
                last = now
                delta = text.step(ev.token_id, last=bool(ev.finish_reason))
                finish = "stop" if text.stopped else ev.finish_reason or ""
                tokens = [] if ev.token_id is None else [ev.token_id]
                yield gateway_pb2.GenerateResponse(
                    token_ids=tokens,
                    text=delta,
                    finish_reason=finish,
                    logprobs=_logprobs(req, count) if tokens else [],
                    cached_prompt_tokens=req.cached_tokens if finish else 0,
                )
                count += len(tokens)
                if text.stopped:  # a stop string: the request ends here and its cache is freed
                    self.core.cancel(req)
                    return

    @grpc_status.unary
    async def Score(self, request, context):
        ids = self._prompt(request.text, request.token_ids)
        self.core.check_score(ids, request.top_k)
        with tracer().start_as_current_span("gateway.score") as span:
            req = Request(ids, score_top_k=request.top_k, span_context=span.get_span_context())
            async for _ in self._events(req):
                pass
        return gateway_pb2.ScoreResponse(
            token_ids=ids,
            positions=[
                gateway_pb2.PositionScore(
                    token_id=p.token_id,
                    logprob=p.logprob,
                    top=[gateway_pb2.TokenLogprob(token_id=t, logprob=v) for t, v in p.top],
                )
                for p in req.scores
            ],
        )

    @grpc_status.unary
    async def GetModelInfo(self, request, context):
        self.core  # noqa: B018 - NOT_SERVING until loaded
        return self.model_info
