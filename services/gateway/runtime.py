"""The gateway assembled from a GatewayConfig: the gRPC server and the OpenAI-compatible HTTP front end (on the
same asyncio loop), serving core on its own thread, placement follower, load recorder. Everything is built here
and handed to what uses it; nothing is patched in afterwards."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable

from expertmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.errors import ServerStoppingError
from services.format.config import ModelConfig
from services.format.generation_config import read_generation_defaults
from services.gateway.chat_template import ChatTemplate
from services.gateway.config import GatewayConfig
from services.gateway.grpc_servicer import SERVICE_NAME, GatewayServicer
from services.gateway.http_app import HttpFrontEnd
from services.gateway.openai_serving import OpenAIServing
from services.gateway.remote_experts import RemoteExperts
from services.gateway.serving import ServingCore
from services.math.device import experts_on, on_host, resolve_device, serving_dtype
from services.rpc.auth import parse_keys
from services.rpc.grpc_server import ManagedServer
from services.rpc.health import wait_serving
from services.rpc.metrics import GatewayMetrics
from services.state.load_store import LoadRecorder, RedisLoadStore
from services.state.placement import Placement
from services.state.placement_store import RedisPlacementStore

log = logging.getLogger(__name__)


class ServingLoop:
    """Steps the serving core on its own thread until stopped; sleeps when there is nothing to do.

    If the loop itself dies (not a failed step: those fail only their requests), every request fails at once
    and `on_death` is called (the runtime turns health NOT_SERVING)."""

    def __init__(
        self,
        core: ServingCore,
        metrics: GatewayMetrics | None = None,
        recorder: LoadRecorder | None = None,
        on_death: Callable[[BaseException], None] | None = None,
    ):
        self.core, self.metrics, self.recorder, self.on_death = core, metrics, recorder, on_death
        self.error: BaseException | None = None
        self._spec_exported = (0, 0)  # MTP drafts verified and accepted, as counted so far
        self._preemptions_exported = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="serving", daemon=True)

    def start(self) -> ServingLoop:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.core.step():
                    self.core.scheduler.wait_for_work(0.05)
                self._export()
        except BaseException as exc:  # noqa: BLE001 - report, fail everything, never hang a client
            log.exception("the serving loop died")
            self.error = exc
            self.core.scheduler.close(exc)
            if self.on_death:
                self.on_death(exc)

    def _export(self) -> None:
        if self.metrics is None:
            return
        m, sched = self.metrics, self.core.scheduler
        m.running.set(len(sched.running))
        m.waiting.set(sched.num_waiting)
        m.kv_cache_usage.set(self.core.cache.usage())
        if sched.preemptions > self._preemptions_exported:
            m.preemptions.inc(sched.preemptions - self._preemptions_exported)
            self._preemptions_exported = sched.preemptions
        drafted, accepted = self._spec_exported
        if sched.draft_tokens > drafted:
            m.spec_draft_tokens.inc(sched.draft_tokens - drafted)
            m.spec_accepted_tokens.inc(sched.accepted_tokens - accepted)
            self._spec_exported = (sched.draft_tokens, sched.accepted_tokens)
        if self.recorder:
            m.load_store_outage.set(self.recorder.outage_seconds)
            m.load_buckets_dropped.set(self.recorder.dropped_buckets)

    def stop(self) -> None:
        self._stop.set()
        self.core.scheduler.wake()
        self.thread.join(timeout=10)


class PlacementFollower:
    """Polls the placement store's version; a new placement is switched to at the next step boundary."""

    def __init__(self, store: RedisPlacementStore, experts: RemoteExperts, interval_s: float = 0.5):
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

    def start(self) -> PlacementFollower:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def wait_for_pools(placement: Placement, timeout_s: float) -> None:
    """Block until every pool of the placement reports SERVING."""
    deadline = time.monotonic() + timeout_s
    for pool in placement.pools.values():
        wait_serving(pool.address, max(0.0, deadline - time.monotonic()), f"pool {pool.pool_id}")


def start_http(config: GatewayConfig, metrics: GatewayMetrics | None, require: bool) -> HttpFrontEnd | None:
    """The OpenAI-compatible front end, bound and answering 503 until the core is attached (None: off, or its
    port taken where it is not required)."""
    if config.http_port < 0:
        return None
    serving = OpenAIServing(
        config.model_name, read_generation_defaults(config.model), ChatTemplate.from_dir(config.model), metrics
    )
    try:
        http = HttpFrontEnd(serving, config.host, config.http_port, parse_keys(config.api_key))
    except OSError as exc:
        if require:
            raise OSError(
                f"cannot listen for HTTP on {config.host}:{config.http_port} (--http-port; 0: any free "
                f"port, -1: off): {exc}"
            ) from None
        log.error("HTTP API off: cannot listen on %s:%d: %s", config.host, config.http_port, exc)
        return None
    http.start()
    return http


class GatewayRuntime:
    """A started gateway: its servers, serving core and loop, remote experts, placement follower, load recorder."""

    def __init__(
        self,
        config: GatewayConfig,
        managed: ManagedServer,
        core: ServingCore,
        experts: RemoteExperts,
        loop: ServingLoop,
        follower: PlacementFollower | None,
        recorder: LoadRecorder | None,
        http: HttpFrontEnd | None = None,
    ):
        self.config, self.managed, self.core, self.experts = config, managed, core, experts
        self.loop, self.follower, self.recorder, self.http = loop, follower, recorder, http
        self._stopping = asyncio.Event()

    @classmethod
    async def start(
        cls,
        config: GatewayConfig,
        placement: Placement,
        metrics: GatewayMetrics | None = None,
        require_http: bool = False,
    ) -> GatewayRuntime:
        """Bind (NOT_SERVING), load the non-expert weights, wait for every pool, then report SERVING.

        The gateway process requires its HTTP port (`require_http`); in-process harnesses that start gateways
        with only grpc_port=0 chosen get no HTTP front end when the default port is taken."""
        cfg = ModelConfig.from_file(config.model)
        device = resolve_device(config.device)  # a missing GPU fails here, naming --device, before anything binds
        if metrics is not None:
            metrics.set_model_name(config.model_name)  # request metrics carry the served model's name, as vLLM's
        managed = ManagedServer(
            [SERVICE_NAME], config.host, config.grpc_port, config.drain_timeout_s, api_keys=parse_keys(config.api_key)
        )
        http = start_http(config, metrics, require_http)
        servicer = GatewayServicer(_model_info(config, cfg, placement), metrics)
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, managed.server)
        await managed.start()
        experts = RemoteExperts(
            placement,
            config.dispatch_dtype,
            config.pool_call_deadline_s,
            metrics=metrics,
            transport=config.pool_transport,
            fewest_pools_max_tokens=config.fewest_pools_max_tokens,
        )
        follower = recorder = None
        if config.redis:
            follower = PlacementFollower(RedisPlacementStore(config.redis), experts).start()
            recorder = LoadRecorder(RedisLoadStore.from_url(config.redis, cfg.moe_layers, cfg.n_routed_experts)).start()
        core = await asyncio.to_thread(_load_core, config, experts_on(experts, device), device, follower, recorder,
                                       metrics)  # fmt: skip
        await asyncio.to_thread(wait_for_pools, placement, config.pool_wait_s)
        aio_loop = asyncio.get_running_loop()

        async def not_serving() -> None:
            if http:
                http.serving_now = False
            await managed.set_serving(False)

        def on_death(exc: BaseException) -> None:  # health says what the loop's death means: no more serving
            asyncio.run_coroutine_threadsafe(not_serving(), aio_loop)

        loop = ServingLoop(core, metrics, recorder, on_death).start()
        servicer.attach(core)
        if http:
            http.serving.attach(core)
            http.serving_now = True
        await managed.set_serving()
        log.info(
            "gateway serving on %s, HTTP on %s (dispatch %s, %d pools)",
            managed.address,
            http.address if http else "none",
            config.dispatch_dtype,
            len(placement.pools),
        )
        return cls(config, managed, core, experts, loop, follower, recorder, http)

    def stop_on_signals(self) -> None:
        aio_loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            aio_loop.add_signal_handler(sig, self.request_stop)

    def request_stop(self) -> None:
        self._stopping.set()
        self.managed.request_stop()

    async def wait_for_stop(self) -> None:
        """Until SIGTERM: drain both front ends (running requests finish, new ones are refused), then end what is
        left with a reason and stop."""
        reason = ServerStoppingError(
            f"the gateway is stopping: running requests had {self.config.drain_timeout_s:g} s "
            "(--drain-timeout-s) to finish"
        )
        end_the_rest = lambda: self.core.scheduler.close(reason)  # noqa: E731
        http = asyncio.ensure_future(self._drain_http(end_the_rest)) if self.http else None
        await self.managed.wait_for_stop(on_drain_timeout=end_the_rest)
        if http is not None:
            await http

    async def _drain_http(self, end_the_rest) -> None:
        await self._stopping.wait()
        self.http.serving_now = False
        if not await self.http.drain(self.config.drain_timeout_s):
            end_the_rest()
            await self.http.drain(1.0)
        await self.http.stop()

    def close(self) -> None:
        if self.http:
            self.http.serving_now = False
            self.http.server.should_exit = True  # uvicorn ends on its loop and closes the listening socket
        self.loop.stop()
        if self.follower:
            self.follower.stop()
        if self.recorder:
            self.recorder.stop()
        self.experts.close()


def _model_info(config: GatewayConfig, cfg: ModelConfig, placement: Placement) -> gateway_pb2.GetModelInfoResponse:
    return gateway_pb2.GetModelInfoResponse(
        model_dir=str(config.model),
        vocab_size=cfg.vocab_size,
        num_hidden_layers=cfg.num_hidden_layers,
        n_routed_experts=cfg.n_routed_experts,
        pools=[p.address for p in placement.pools.values()],
        dispatch_dtype=config.dispatch_dtype,
    )


def _load_core(config: GatewayConfig, experts, device, follower, recorder, metrics) -> ServingCore:
    """The serving core on `device`, everything it calls handed in (nothing patched in afterwards)."""
    return ServingCore.from_dir(
        config.model,
        experts,
        device=device,
        dtype=serving_dtype(device),
        cache_tokens=config.cache_tokens,
        block_size=config.block_size,
        prefix_caching=config.prefix_caching,
        routing_observer=on_host(recorder.observe) if recorder else None,
        max_step_tokens=config.max_step_tokens,
        max_decode_stall=config.max_decode_stall,
        max_running=config.max_running,
        max_waiting=config.max_waiting,
        micro_batches=config.micro_batches,
        burst_threads=config.burst_threads,
        mtp=config.mtp,
        num_speculative_tokens=config.num_speculative_tokens,
        mtp_max_batch=config.mtp_max_batch,
        before_step=follower.apply_pending if follower else None,
        on_finish=metrics.request_finished if metrics else None,
    )
