"""The gateway server: GatewayService over gRPC, the continuous-batching scheduler on its own thread, and the
routed experts on remote pools.

Placement comes from Redis (polled by version; switched at a step boundary) or, without Redis, a file.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from pathlib import Path

import torch

from expertmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.rpc import grpc_status
from services.errors import InvalidRequestError, PoolUnavailableError
from services.rpc.grpc_server import ManagedServer
from services.rpc.health import wait_serving
from services.state.load_store import LoadRecorder, RedisLoadStore
from services.rpc.metrics import GatewayMetrics, serve_metrics
from services.state.placement import Placement
from services.state.placement_store import load_placement
from services.rpc.telemetry import setup_tracing, tracer
from services.gateway.engine import Engine
from services.gateway.remote_experts import RemoteExperts
from services.gateway.sampling import SamplingParams
from services.gateway.scheduler import Request, Scheduler

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


class SchedulerThread:
    """Runs scheduler steps until stopped; sleeps when there is nothing to do."""

    def __init__(self, scheduler: Scheduler, metrics: GatewayMetrics | None = None, recorder=None):
        self.scheduler = scheduler
        self.metrics = metrics
        self.recorder = recorder
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> "SchedulerThread":
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.scheduler.step():
                self.scheduler.wait_for_work(0.05)
            if self.metrics:
                m, sched = self.metrics, self.scheduler
                m.running.set(len(sched.running))
                m.waiting.set(sched.num_waiting)
                m.kv_cache_usage.set(sched.cache.usage())
                if self.recorder:
                    m.load_store_outage.set(self.recorder.outage_seconds)
                    m.load_buckets_dropped.set(self.recorder.dropped_buckets)

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.wake()
        self.thread.join(timeout=10)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Serves once `engine` is set (the server reports NOT_SERVING until then)."""

    def __init__(self, engine: Engine | None, model_dir: str, pools: list[str], dispatch_dtype: str,
                 metrics: GatewayMetrics | None = None):
        self._engine = engine
        self.metrics = metrics
        self.model_dir = model_dir
        self.pools = pools
        self.dispatch_dtype = dispatch_dtype

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise PoolUnavailableError("gateway", "still loading the model")
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine = engine

    def _prompt(self, text: str, token_ids) -> list[int]:
        if text and token_ids:
            raise InvalidRequestError("give text or token_ids, not both")
        if text:
            return self.engine.encode(text)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        return list(token_ids)

    @grpc_status.stream
    async def Generate(self, request, context):
        prompt = self._prompt(request.text, request.token_ids)
        s = request.sampling
        params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k,
                                seed=s.seed if s.HasField("seed") else None, stop_token_ids=tuple(s.stop_token_ids),
                                ignore_eos=s.ignore_eos)
        self.engine.check_request(prompt, params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        with tracer().start_as_current_span("gateway.request") as span:
            span.set_attribute("expertmesh.prompt_tokens", len(prompt))
            req = Request(prompt, params, on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
            req.span_context = span.get_span_context()
            self.engine.scheduler.submit(req)
            try:
                yield gateway_pb2.GenerateResponse(prompt_token_ids=prompt)
                text_so_far = ""
                last = arrived = time.monotonic()
                while True:
                    ev = await events.get()
                    if ev.error is not None:
                        raise ev.error
                    now = time.monotonic()
                    if self.metrics and ev.token_id is not None:
                        (self.metrics.ttft if last == arrived else self.metrics.itl).observe(now - last)
                    last = now
                    text = self.engine.decode(req.output)
                    delta, text_so_far = text[len(text_so_far):], text
                    yield gateway_pb2.GenerateResponse(token_ids=[] if ev.token_id is None else [ev.token_id],
                                                       text=delta, finish_reason=ev.finish_reason or "")
                    if ev.finish_reason:
                        return
            finally:
                if not req.done:  # the client went away (or the stream failed): free its cache
                    self.engine.scheduler.cancel(req)

    @grpc_status.unary
    async def Score(self, request, context):
        ids = self._prompt(request.text, request.token_ids)
        self.engine.check_tokens(ids)
        with tracer().start_as_current_span("gateway.score"):
            positions = await asyncio.wrap_future(self.engine.scheduler.call(lambda: self.engine.score(ids, request.top_k)))
        return gateway_pb2.ScoreResponse(token_ids=ids, positions=[
            gateway_pb2.PositionScore(token_id=p.token_id, logprob=p.logprob,
                                      top=[gateway_pb2.TokenLogprob(token_id=t, logprob=v) for t, v in p.top])
            for p in positions])

    @grpc_status.unary
    async def GetModelInfo(self, request, context):
        cfg = self.engine.cfg
        return gateway_pb2.GetModelInfoResponse(
            model_dir=self.model_dir, vocab_size=cfg.vocab_size, num_hidden_layers=cfg.num_hidden_layers,
            n_routed_experts=cfg.n_routed_experts, max_context=self.engine.max_context, pools=self.pools,
            dispatch_dtype=self.dispatch_dtype)


class PlacementFollower:
    """Polls the placement store's version; a new placement is switched to at the next step boundary."""

    def __init__(self, store, experts: RemoteExperts, interval_s: float = 0.5):
        self.store, self.experts, self.interval_s = store, experts, interval_s
        self._pending: Placement | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="placement", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.store.version() > self.experts.placement.version:
                    self._pending = self.store.get()
            except Exception as exc:  # noqa: BLE001 - Redis away: keep the placement we have
                log.warning("placement store unreachable: %s", exc)

    def apply_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            log.info("switching to placement version %d", pending.version)
            self.experts.set_placement(pending)

    def start(self) -> "PlacementFollower":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def wait_for_pools(placement: Placement, timeout_s: float) -> None:
    """Block until every pool of the placement reports SERVING."""
    deadline = time.monotonic() + timeout_s
    for pool in placement.pools.values():
        wait_serving(pool.address, max(0.0, deadline - time.monotonic()), f"pool {pool.pool_id}")


class GatewayRuntime:
    """A started gateway: its server, engine, scheduler thread and placement follower."""

    def __init__(self, managed: ManagedServer, engine: Engine, experts: RemoteExperts, loop_thread: SchedulerThread,
                 follower: PlacementFollower | None, recorder: LoadRecorder | None):
        self.managed, self.engine, self.experts = managed, engine, experts
        self.loop_thread, self.follower, self.recorder = loop_thread, follower, recorder

    def close(self) -> None:
        self.loop_thread.stop()
        if self.follower:
            self.follower.stop()
        if self.recorder:
            self.recorder.stop()
        self.experts.close()


async def start_gateway(model_dir: Path, placement: Placement, dispatch_dtype: str = "fp8", host: str = "127.0.0.1",
                        port: int = 0, redis_url: str | None = None, cache_tokens: int = 32768,
                        deadline_s: float = 10.0, pool_timeout_s: float = 120.0, micro_batches: int = 1,
                        metrics: GatewayMetrics | None = None) -> GatewayRuntime:
    """Bind (NOT_SERVING), load the non-expert weights, wait for every pool, then report SERVING."""
    managed = ManagedServer([SERVICE_NAME], host, port)
    servicer = GatewayServicer(None, str(model_dir), [p.address for p in placement.pools.values()], dispatch_dtype,
                               metrics)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, managed.server)
    await managed.start()
    experts = RemoteExperts(placement, 0, dispatch_dtype, deadline_s, metrics=metrics)
    engine = await asyncio.to_thread(Engine.from_dir, model_dir, experts=experts, cache_tokens=cache_tokens)
    experts.n_routed_experts = engine.cfg.n_routed_experts
    engine.scheduler.micro_batches = micro_batches
    follower = recorder = None
    if redis_url:
        from services.state.placement_store import RedisPlacementStore

        follower = PlacementFollower(RedisPlacementStore(redis_url), experts).start()
        engine.scheduler.on_step = follower.apply_pending
        recorder = LoadRecorder(RedisLoadStore.from_url(redis_url, engine.cfg.moe_layers, engine.cfg.n_routed_experts)).start()
        engine.model.routing_observer = recorder.observe
    await asyncio.to_thread(wait_for_pools, placement, pool_timeout_s)
    loop_thread = SchedulerThread(engine.scheduler, metrics, recorder).start()
    servicer.engine = engine
    await managed.set_serving()
    log.info("gateway serving on %s (dispatch %s, %d pools)", managed.address, dispatch_dtype, len(placement.pools))
    return GatewayRuntime(managed, engine, experts, loop_thread, follower, recorder)


async def serve(model_dir: Path, placement: Placement, dispatch_dtype: str = "fp8", host: str = "127.0.0.1",
                port: int = 0, redis_url: str | None = None, cache_tokens: int = 32768, deadline_s: float = 10.0,
                micro_batches: int = 1, metrics_port: int = 0) -> None:
    setup_tracing("expertmesh-gateway")
    metrics = GatewayMetrics()
    serve_metrics(metrics_port, host)
    runtime = await start_gateway(model_dir, placement, dispatch_dtype, host, port, redis_url, cache_tokens, deadline_s,
                                  micro_batches=micro_batches, metrics=metrics)
    runtime.managed.stop_on_signals()
    print(f"READY {runtime.managed.address}", flush=True)
    await runtime.managed.wait_for_stop()
    runtime.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="expertmesh gateway")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--placement", type=Path, help="placement JSON (when not read from Redis)")
    ap.add_argument("--redis", help="redis URL holding the placement")
    ap.add_argument("--dispatch-dtype", default="fp8", choices=["fp8", "bf16", "fp32"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cache-tokens", type=int, default=32768)
    ap.add_argument("--deadline", type=float, default=10.0, help="seconds per expert-pool call")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    ap.add_argument("--placement-timeout", type=float, default=600.0, help="seconds to wait for a placement in Redis")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="split each step so attention of one part overlaps the pools' work on another")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    deadline = time.monotonic() + args.placement_timeout
    while True:  # on a fresh cluster the autoscaler publishes the first placement once the pools serve
        try:
            placement = load_placement(args.redis, args.placement)
            break
        except InvalidRequestError as exc:
            if not args.redis or time.monotonic() > deadline:
                sys.exit(f"expertmesh gateway: {exc}")
            time.sleep(1.0)
    asyncio.run(serve(args.model, placement, args.dispatch_dtype, args.host, args.port, args.redis,
                      args.cache_tokens, args.deadline, args.micro_batches, args.metrics_port))


if __name__ == "__main__":
    main()
