"""Remote routed experts: the experts seam over gRPC to expert pools.

Per MoE layer, each pool gets the tokens routed to any expert it hosts, each token once, with that token's
(expert, weight) pairs for the pool; all pools are sent their share at once, each request on the gateway's
long-lived ForwardStream to that pool (`transport="stream"`, services.gateway.pool_stream; or one unary Forward
call per pool per layer on a pool of caller threads, `transport="unary"`), every request with a deadline; the
BF16 (or fp32) partial sums that come back are added on the gateway.

Replicas: an expert with several replicas has its tokens dealt over them by the placement's shares (by token
count: with shares 0.25 / 0.75, a quarter of its pairs to the first replica); a dead replica's share goes to the
live ones in proportion to theirs. A layer of at most `fewest_pools_max_tokens` tokens goes instead to as few
pools as hold its experts: at such sizes a pool's work is small beside a round trip, and every extra pool in
flight adds one (ties go round the pools in turn, so that they share the work).
Failover: a pool whose call fails is marked dead (no more routing to it until the placement changes or
`dead_for_s` passes) and the failed call's pairs are re-sent to other live replicas of the same experts; only
when an expert has no live replica left does the step fail, with PoolUnavailableError. A pool that answers
FAILED_PRECONDITION (it no longer holds the expert: a rollout dropped it) is skipped for that call only.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
import torch
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from expertmesh.v1 import expert_pool_pb2
from services.dispatch import DISPATCH_DTYPES, POOL_TRANSPORTS, codec
from services.errors import InvalidRequestError, PoolUnavailableError
from services.gateway.config import DEFAULT_FEWEST_POOLS_MAX_TOKENS
from services.gateway.pool_stream import MESSAGE_SPAN, PoolCallError, PoolStream
from services.math.experts import Pending
from services.math.routed_pairs import RoutedPairs
from services.rpc import telemetry, tls
from services.rpc.grpc_server import CHANNEL_OPTIONS
from services.rpc.telemetry import tracer
from services.state.placement import Placement

log = logging.getLogger(__name__)
DEFAULT_DEADLINE_S = 10.0
DEAD_FOR_S = 30.0
FORWARD_METHOD = f"/{expert_pool_pb2.DESCRIPTOR.services_by_name['ExpertPoolService'].full_name}/Forward"
MAX_CONCURRENT_CALLS = 64  # unary transport: pool calls in flight at once (threads made as needed, then reused)


@dataclass
class _Call:
    pool: int  # index into pool_ids
    tokens: torch.Tensor  # [N] rows of `hidden` sent, each once
    pairs: Callable[[], RoutedPairs]  # -> the pairs sent (token: row of the layer's `hidden`), for failover
    future: Future | None  # -> ForwardResponse, or raises grpc.RpcError
    sent_at: float
    span: trace.Span | None = None  # streamed and traced: the request's client span


class RemoteExperts:
    def __init__(
        self,
        placement: Placement,
        dispatch_dtype: str = "fp8",
        deadline_s: float = DEFAULT_DEADLINE_S,
        dead_for_s: float = DEAD_FOR_S,
        metrics=None,
        transport: str = "stream",
        fewest_pools_max_tokens: int = DEFAULT_FEWEST_POOLS_MAX_TOKENS,
    ):
        if dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(f"dispatch dtype must be one of {DISPATCH_DTYPES}, got {dispatch_dtype!r}")
        if transport not in POOL_TRANSPORTS:
            raise ValueError(f"transport must be one of {POOL_TRANSPORTS}, got {transport!r}")
        self.transport = transport
        self.fewest_pools_max_tokens = fewest_pools_max_tokens
        self._turn = 0  # the pool that wins the next tie of _fewest_pools
        self.timings: list[dict] | None = None  # a list to fill: where each pool request's time went
        self.dispatch_dtype = dispatch_dtype
        self.deadline_s = deadline_s
        self.dead_for_s = dead_for_s
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._forward: dict[str, grpc.UnaryUnaryMultiCallable] = {}  # pool -> Forward taking serialized bytes
        self._streams: dict[str, PoolStream] = {}
        self._dead_until: dict[str, float] = {}
        self.bytes_sent = 0
        self.tokens_sent = 0
        self.failovers = 0
        self.metrics = metrics  # GatewayMetrics or None
        # grpc's `.future()` starts a channel thread per call when none is in flight (every MoE layer); blocking
        # calls on reused threads cost a hand-off instead (BENCHMARKS.md has the figures)
        self._callers = ThreadPoolExecutor(max_workers=MAX_CONCURRENT_CALLS, thread_name_prefix="pool-call")
        self.set_placement(placement)

    def set_placement(self, placement: Placement) -> None:
        """Switch to a placement (between steps): per layer, a [E, R] table of replica pool indices."""
        with self._lock:
            self.placement = placement
            if self.metrics:
                self.metrics.placement_version.set(placement.version)
            self.pool_ids = sorted(placement.pools)
            index = {p: i for i, p in enumerate(self.pool_ids)}
            self.replicas: dict[int, torch.Tensor] = {}  # layer -> [E, R] pool index, -1 padded
            self.shares: dict[int, torch.Tensor] = {}  # layer -> [E, R] share of the expert's pairs, 0 padded
            for layer, experts in placement.replicas.items():
                width = max(len(r) for r in experts)
                table = torch.full((len(experts), width), -1, dtype=torch.int64)
                shares = torch.zeros((len(experts), width), dtype=torch.float64)
                for e, pools in enumerate(experts):
                    table[e, : len(pools)] = torch.tensor([index[p] for p in pools])
                    shares[e, : len(pools)] = torch.tensor(placement.shares_of(layer, e), dtype=torch.float64)
                self.replicas[layer] = table
                self.shares[layer] = shares
            self._dead_until = {p: t for p, t in self._dead_until.items() if p in placement.pools}
            for pool_id, pool in placement.pools.items():
                if pool_id not in self._channels:
                    self._channels[pool_id] = tls.channel(pool.address, options=CHANNEL_OPTIONS)
                    # requests are serialized on the calling thread, before any call starts: the caller threads
                    # then hold the GIL only to hand bytes to grpc's core, not to build messages
                    self._forward[pool_id] = self._channels[pool_id].unary_unary(
                        FORWARD_METHOD,
                        request_serializer=None,
                        response_deserializer=expert_pool_pb2.ForwardResponse.FromString,
                    )
                    self._streams[pool_id] = PoolStream(self._channels[pool_id])

    # ---- routing ----------------------------------------------------------------------------------------------
    def _live_table(self, layer: int, exclude: set[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, R] replica table, [E, R] shares) with dead (and excluded) pools removed (-1, share 0), live
        replicas first; the dead replicas' shares go to the live ones in proportion (evenly where theirs are 0)."""
        table, shares = self.replicas[layer], self.shares[layer]
        now = time.monotonic()
        dead = [i for i, p in enumerate(self.pool_ids) if self._dead_until.get(p, 0) > now or i in exclude]
        if not dead:
            return table, shares
        alive = (table >= 0) & ~torch.isin(table, torch.tensor(dead))  # [E, R]
        order = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)
        kept = torch.where(alive, shares, 0.0)  # [E, R]
        total = kept.sum(1, keepdim=True)  # [E, 1]
        even = alive / alive.sum(1, keepdim=True).clamp(min=1)  # [E, R]
        kept = torch.where(total > 0, kept / total.clamp(min=1e-300), even)
        return torch.where(alive, table, -1).gather(1, order), kept.gather(1, order)

    def _assign(
        self, layer: int, pair_expert: torch.Tensor, tokens: int, exclude: set[int] = frozenset()
    ) -> torch.Tensor:
        """[P] experts (of `tokens` tokens) -> [P] pool index: each expert's pairs dealt over its live replicas by
        their shares (the pair of rank r among its expert's n pairs goes to the replica whose cumulative share
        interval holds (r + 0.5) / n); for at most `fewest_pools_max_tokens` tokens, the fewest pools instead."""
        table, shares = self._live_table(layer, exclude)  # [E, R], [E, R]
        if table.shape[1] == 1 and table is self.replicas[layer]:
            return table[pair_expert, 0]  # one replica of every expert, all live: nothing to deal (the common case)
        count = (table >= 0).sum(1)[pair_expert]  # [P]
        if bool((count == 0).any()):
            expert = int(pair_expert[count == 0][0])
            raise PoolUnavailableError(
                ",".join(self.placement.pools_for(layer, expert)), f"no live replica of layer {layer} expert {expert}"
            )
        if tokens <= self.fewest_pools_max_tokens:
            return self._fewest_pools(table, pair_expert)
        order = torch.argsort(pair_expert, stable=True)
        rank = torch.empty_like(order)
        sorted_e = pair_expert[order]
        starts = torch.searchsorted(sorted_e, sorted_e, side="left")
        rank[order] = torch.arange(len(order)) - starts  # position of the pair among its expert's pairs
        pairs_of = torch.bincount(pair_expert, minlength=table.shape[0])[pair_expert]  # [P] pairs of its expert
        point = (rank.to(torch.float64) + 0.5) / pairs_of  # [P] in (0, 1)
        ends = shares.cumsum(1)[pair_expert]  # [P, R] where each replica's interval ends
        replica = (ends <= point[:, None]).sum(1)  # [P] the first replica whose interval ends past the point
        return table[pair_expert, torch.minimum(replica, count - 1)]

    def _fewest_pools(self, table: torch.Tensor, pair_expert: torch.Tensor) -> torch.Tensor:
        """[P] experts -> [P] pool index, over as few pools as hold them all (greedy cover: the pool holding the most
        of the experts left, until none is left; ties to the pool next in turn). table [E, R]: live replicas, -1
        padded; every expert of `pair_expert` has one."""
        experts = pair_expert.tolist()
        holders = {e: [p for p in table[e].tolist() if p >= 0] for e in set(experts)}
        n, first = len(self.pool_ids), self._turn
        self._turn = (first + 1) % n
        chosen: dict[int, int] = {}
        while len(chosen) < len(holders):
            held = collections.Counter(p for e, pools in holders.items() if e not in chosen for p in pools)
            best = max(held, key=lambda p: (held[p], -((p - first) % n)))
            chosen.update((e, best) for e, pools in holders.items() if e not in chosen and best in pools)
        return torch.tensor([chosen[e] for e in experts], dtype=torch.int64)

    def _send(self, layer: int, hidden: torch.Tensor, pairs: RoutedPairs, pool_of_pair: torch.Tensor) -> list[_Call]:
        started = time.perf_counter()
        rows = codec.DispatchRows(hidden, self.dispatch_dtype)  # e4m3 quantization once for every pool
        prepared = []
        for share in codec.split_for_pools(rows, pairs, pool_of_pair, len(self.pool_ids)):
            message = expert_pool_pb2.ForwardStreamRequest() if self.transport == "stream" else None
            into = message.request if message is not None else None  # written in place: no copy of the tensors
            tokens, request = codec.encode_request(layer, rows, share, self.placement.version, into)  # tokens [N_p]
            prepared.append((_Call(share.owner, tokens, share.pairs, None, 0.0), message or request))
        encoded = time.perf_counter()
        calls = []
        for call, request in prepared:
            pool_id = self.pool_ids[call.pool]
            self.tokens_sent += call.tokens.numel()
            call.sent_at = time.monotonic()
            if self.transport == "stream":
                call.span = self._message_span(pool_id, request)
                call.future, sent = self._streams[pool_id].send(request)
            else:  # serialized here, so that the caller threads only hand bytes to grpc's core
                data = request.SerializeToString()
                sent = len(data)
                call.future = self._callers.submit(
                    contextvars.copy_context().run, self._forward[pool_id], data, timeout=self.deadline_s
                )  # the caller's trace context goes along
                call.future.add_done_callback(_stamp_arrival)
            self.bytes_sent += sent  # the whole message: activations, scales, pairs
            calls.append(call)
            if self.metrics:
                self.metrics.routed_tokens.labels(pool_id).inc(call.tokens.numel())
        if self.timings is not None:
            self.timings.append({"encode_s": encoded - started, "send_s": time.perf_counter() - encoded})
        return calls

    @staticmethod
    def _message_span(pool_id: str, request: expert_pool_pb2.ForwardStreamRequest) -> trace.Span | None:
        """A client span for one streamed request, its context in the message, when this dispatch is traced."""
        if not trace.get_current_span().is_recording():
            return None
        span = tracer().start_span(MESSAGE_SPAN, kind=SpanKind.CLIENT, attributes={"expertmesh.pool": pool_id})
        propagate.inject(request.trace_context, context=trace.set_span_in_context(span))
        return span

    def start(self, layer: int, hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> Pending:
        span, token = trace.INVALID_SPAN, None  # no span at all where tracing is off (services.rpc.telemetry)
        if telemetry.active():
            span = tracer().start_span(
                "moe.dispatch", attributes={"expertmesh.layer": layer, "expertmesh.tokens": topk_idx.shape[0]}
            )
            token = otel_context.attach(trace.set_span_in_context(span))  # pool calls: children of the dispatch
        pairs = RoutedPairs.from_topk(topk_idx, topk_w)  # [T*K]
        try:
            with self._lock:
                calls = self._send(layer, hidden, pairs, self._assign(layer, pairs.expert, topk_idx.shape[0]))
        except BaseException:
            span.end()
            raise
        finally:
            if token is not None:
                otel_context.detach(token)

        def wait() -> torch.Tensor:
            out = torch.zeros_like(hidden)
            try:
                self._collect(layer, hidden, calls, out, span)
            finally:
                span.end()
            return out

        return wait

    def _collect(self, layer: int, hidden: torch.Tensor, calls: list[_Call], out: torch.Tensor, span) -> None:
        pending = calls
        exclude: set[int] = set()  # pools that failed this call: not again for it
        for _ in range(len(self.pool_ids) + 1):  # each retry round excludes at least one more pool
            failed: list[_Call] = []
            for call in pending:
                pool_id = self.pool_ids[call.pool]
                try:
                    response = self._result(call)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # our request is wrong: no retry helps
                        raise PoolUnavailableError(pool_id, f"rejected the batch: {exc.details()}") from None
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # not merely "expert not held here"
                        self._mark_dead(pool_id, f"{exc.code().name}: {exc.details()}")
                    exclude.add(call.pool)
                    if self.metrics:
                        self.metrics.pool_failures.labels(pool_id).inc()
                    failed.append(call)
                    continue
                answered = time.monotonic()
                if self.metrics:
                    self.metrics.pool_call.labels(pool_id).observe(answered - call.sent_at)
                try:
                    partial = codec.decode_partial(response, call.tokens.numel(), hidden.shape[1], hidden.dtype)
                except InvalidRequestError as exc:  # a pool answering nonsense is a bug there: no retry helps
                    raise PoolUnavailableError(pool_id, f"malformed answer: {exc}") from None
                out.index_add_(0, call.tokens, partial)  # [N, H] onto the pool's rows
                if self.timings is not None:
                    self.timings.append(_hops(pool_id, call, response, answered, time.monotonic()))
            if not failed:
                return
            self.failovers += len(failed)
            pairs = RoutedPairs.cat([c.pairs() for c in failed])
            ctx = otel_context.attach(trace.set_span_in_context(span))
            try:
                with self._lock:
                    tokens = int(pairs.token.unique().numel())
                    pending = self._send(layer, hidden, pairs, self._assign(layer, pairs.expert, tokens, exclude))
            finally:
                otel_context.detach(ctx)
        raise PoolUnavailableError("all", f"layer {layer}: retries exhausted")

    def _result(self, call: _Call) -> expert_pool_pb2.ForwardResponse:
        """The pool's answer; a timeout or failure raises grpc.RpcError (a timed-out stream is reset)."""
        try:
            return call.future.result(timeout=self.deadline_s)
        except FutureTimeout:
            if self.transport == "stream":
                self._streams[self.pool_ids[call.pool]].reset()
            raise PoolCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.deadline_s} s") from None
        finally:
            if call.span is not None:
                call.span.end()

    def _mark_dead(self, pool_id: str, why: str) -> None:
        with self._lock:
            if self._dead_until.get(pool_id, 0) <= time.monotonic():
                log.warning("expert pool %s failed (%s): routing around it", pool_id, why)
            self._dead_until[pool_id] = time.monotonic() + self.dead_for_s

    def close(self) -> None:
        self._callers.shutdown(wait=False, cancel_futures=True)
        for stream in self._streams.values():
            stream.close()
        for channel in self._channels.values():
            channel.close()


def _stamp_arrival(future: Future) -> None:
    """A unary call's answer arrived (its caller thread returned): when, as the stream's reader thread stamps it."""
    future.arrived_at = time.monotonic()


def _hops(pool_id: str, call: _Call, response: expert_pool_pb2.ForwardResponse, taken: float, combined: float) -> dict:
    """Where one pool request's time went (seconds), for `RemoteExperts.timings`: the round trip from the send to
    the compute thread taking the answer, and within it the pool's decode and compute (its own figures); with the
    pool's monotonic stamps (one host: the local deployment) also the way there (send to the pool's handler), the
    pool's encode, the way back (its answer encoded to the gateway's reader) and the hand-off to the compute
    thread."""
    hops = {
        "pool": pool_id,
        "round_trip_s": taken - call.sent_at,
        "decode_s": response.decode_us * 1e-6,
        "compute_s": response.compute_us * 1e-6,
        "combine_s": combined - taken,
    }
    arrived = getattr(call.future, "arrived_at", None)
    if response.received_ns and response.answered_ns and arrived is not None:
        received, answered = response.received_ns * 1e-9, response.answered_ns * 1e-9
        hops["there_s"] = received - call.sent_at
        hops["pool_encode_s"] = answered - received - hops["decode_s"] - hops["compute_s"]
        hops["back_s"] = arrived - answered
        hops["handoff_s"] = taken - arrived
    return hops
