"""The expert-pool server: holds its assigned (layer, expert) weights in FP8 and runs routed experts for gateways.

NOT_SERVING until its weights are loaded; every request is validated (malformed tensors, shapes and ids against
the model, too large: services.dispatch.codec; unknown layer, experts not held: here) and answered with a status
and a message; SIGTERM finishes in-flight calls first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from opentelemetry import propagate
from opentelemetry.trace import SpanKind

from expertmesh.v1 import expert_pool_pb2, expert_pool_pb2_grpc
from kernels import cpu_routed
from services.dispatch import codec
from services.dispatch.precision import reduced_compute_dtype
from services.errors import ExpertNotHeldError, InvalidRequestError
from services.expert.grouped import grouped_pairs_forward
from services.expert.store import ExpertStore, LayerWeights
from services.format.checkpoint import CheckpointReader
from services.math.device import DEVICE_CHOICES, DEVICE_HELP, DeviceUnavailableError, resolve_device
from services.rpc import grpc_status, malformed
from services.rpc.draining import DrainingInterceptor
from services.rpc.grpc_server import ManagedServer
from services.rpc.metrics import PoolMetrics, serve_metrics
from services.rpc.telemetry import hot_span, setup_tracing

log = logging.getLogger(__name__)
SERVICE_NAME = expert_pool_pb2.DESCRIPTOR.services_by_name["ExpertPoolService"].full_name
FORWARD_STREAM_SPAN = f"{SERVICE_NAME}/ForwardStream message"  # one server span per streamed request
# Batches of up to this many (token, expert) pairs (decode) are computed on the event loop: handing them to the
# compute thread costs GIL contention with the loop (BENCHMARKS.md). Larger ones (prefill) go to the thread, so
# that health checks are answered while they run.
INLINE_MAX_PAIRS = 256


class ExpertPoolServicer(expert_pool_pb2_grpc.ExpertPoolServiceServicer):
    def __init__(self, store: ExpertStore, pool_id: str, metrics: PoolMetrics | None = None):
        self.store = store
        self.metrics = metrics
        self.cfg = store.cfg
        self.pool_id = pool_id
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-compute")
        self.forward_calls = 0
        self.routed_pairs = 0
        self.placement_version = 0
        self._managing = 0  # load/unload calls running on the compute thread (the store changes under them)
        self.draining: DrainingInterceptor | None = None  # the server's, once it has one: streamed requests count

    # ---- inference -----------------------------------------------------------------------------------
    @grpc_status.unary
    async def Forward(self, request, context):
        return await self._answer(request)

    async def ForwardStream(self, request_iterator, context):
        """One gateway's long-lived stream: requests answered in order, a failed one in band (error_code), so
        the stream outlives bad requests; a stopping pool ends it with UNAVAILABLE (the gateway fails over)."""
        async for request in request_iterator:
            if self.draining is not None and self.draining.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            with self.draining.track(SERVICE_NAME) if self.draining is not None else contextlib.nullcontext():
                yield await self._answer_in_band(request)

    async def _answer_in_band(self, message) -> expert_pool_pb2.ForwardStreamResponse:
        """A streamed request's answer, or its failure as error_code and error_message; echoes its id."""
        answer = expert_pool_pb2.ForwardStreamResponse()
        if isinstance(message, malformed.Malformed):
            error = InvalidRequestError(f"the request does not parse as ForwardStreamRequest: {message.error}")
            code, answer.error_message = grpc_status.code_and_message(error)
            answer.error_code = code.value[0]
            return answer
        answer.id = message.id
        parent = propagate.extract(message.trace_context) if message.trace_context else None
        with hot_span(FORWARD_STREAM_SPAN, context=parent, kind=SpanKind.SERVER):
            try:
                await self._answer(message.request, into=answer.response)
            except Exception as exc:  # noqa: BLE001 - answered in band; the stream keeps serving
                code, answer.error_message = grpc_status.code_and_message(exc)
                answer.error_code = code.value[0]
                answer.ClearField("response")
        return answer

    async def _answer(
        self, request: expert_pool_pb2.ForwardRequest, into: expert_pool_pb2.ForwardResponse | None = None
    ) -> expert_pool_pb2.ForwardResponse:
        received_ns, started = time.monotonic_ns(), time.perf_counter()
        batch = self._decode(request)
        decoded = time.perf_counter()
        n_pairs = len(batch.pairs)
        with hot_span("expert.compute") as span:
            if span is not None:
                span.set_attribute("expertmesh.layer", batch.layer)
                span.set_attribute("expertmesh.tokens", batch.hidden.shape[0])
                span.set_attribute("expertmesh.pairs", n_pairs)
            args = (
                batch.hidden.to(self.store.device),
                batch.pairs,
                LayerWeights(self.store, batch.layer, batch.hidden.dtype),
                self.cfg.n_routed_experts,
            )
            if n_pairs <= INLINE_MAX_PAIRS and not self._managing:
                out = grouped_pairs_forward(*args)
            else:
                out = await asyncio.get_running_loop().run_in_executor(self.compute, grouped_pairs_forward, *args)
        computed = time.perf_counter()
        self.forward_calls += 1
        self.routed_pairs += n_pairs
        self.placement_version = max(self.placement_version, request.placement_version)
        if self.metrics:
            self.metrics.forward.observe(computed - started)
            self.metrics.routed_pairs.inc(n_pairs)
        response = codec.encode_response(out, batch.reply_dtype, into)
        response.decode_us = int((decoded - started) * 1e6)
        response.compute_us = int((computed - decoded) * 1e6)
        response.received_ns, response.answered_ns = received_ns, time.monotonic_ns()
        return response

    def _decode(self, request) -> codec.PoolBatch:
        """The request checked against the model (codec) and against what this pool holds."""
        self.store.check(request.layer, 0)
        held = self.store.held_mask(request.layer)  # [E] bool
        batch = codec.decode_request(
            request, self.cfg.hidden_size, self.cfg.n_routed_experts, self.store.device.type, held
        )
        if len(batch.pairs) and not batch.held_checked:
            missing = batch.pairs.expert[~held[batch.pairs.expert]]
            if missing.numel():
                raise ExpertNotHeldError(
                    f"pool {self.pool_id} does not hold expert {int(missing.min())} of layer {batch.layer}"
                )
        return batch

    # ---- management ------------------------------------------------------------------------------------
    @grpc_status.unary
    async def GetStatus(self, request, context):
        return expert_pool_pb2.GetStatusResponse(
            pool_id=self.pool_id,
            experts=[expert_pool_pb2.ExpertRef(layer=l, expert=e) for l, e in self.store.loaded()],
            weight_bytes=self.store.nbytes(),
            forward_calls=self.forward_calls,
            routed_pairs=self.routed_pairs,
            placement_version=self.placement_version,
        )

    @grpc_status.unary
    async def LoadExperts(self, request, context):
        refs = [(r.layer, r.expert) for r in request.experts]
        for layer, expert in refs:
            self.store.check(layer, expert)
        await self.change_store(self.load, refs)
        return expert_pool_pb2.LoadExpertsResponse(loaded=len(refs))

    @grpc_status.unary
    async def UnloadExperts(self, request, context):
        refs = [(r.layer, r.expert) for r in request.experts]
        await self.change_store(lambda: [self.store.unload(l, e) for l, e in refs])
        self._held_metrics()
        return expert_pool_pb2.UnloadExpertsResponse(unloaded=len(refs))

    async def change_store(self, fn, *args) -> None:
        """Store changes run on the compute thread, after the compute queued before them; meanwhile no batch is
        computed inline on the event loop."""
        self._managing += 1
        try:
            await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)
        finally:
            self._managing -= 1

    def _held_metrics(self) -> None:
        if self.metrics:
            self.metrics.experts_loaded.set(len(self.store.loaded()))
            self.metrics.weight_bytes.set(self.store.nbytes())

    def load(self, refs: list[tuple[int, int]]) -> None:
        for layer, expert in refs:
            self.store.load(layer, expert)
        for layer in sorted({l for l, _ in refs}):  # for fp8 dispatch (the default); float32 ones on first use
            self.store.prepare(layer, reduced_compute_dtype(self.store.device.type))
        self._held_metrics()


async def start_pool(
    model_dir: Path,
    pool_id: str,
    experts: list[tuple[int, int]],
    host: str = "127.0.0.1",
    port: int = 0,
    metrics: PoolMetrics | None = None,
    device: str = "cpu",
    dense_experts: bool = False,
) -> tuple[ManagedServer, ExpertPoolServicer]:
    """Bind, report NOT_SERVING, load the assigned experts, then report SERVING. `device` (cpu, cuda, auto) is
    resolved first: asking for a missing GPU fails before anything binds. The experts stay FP8 (on the CPU the
    kernel reads their e4m3 bytes); `dense_experts` keeps a dense fp32 copy of each beside them on the CPU (also
    kept where the kernel cannot convert e4m3 in hardware)."""
    resolved = resolve_device(device)
    # without the kernel's hardware e4m3 conversion (no C compiler, no F16C) FP8-only experts would compute slower
    # than from dense copies: keep them there
    dense = dense_experts or (resolved.type == "cpu" and not cpu_routed.fast_e4m3())
    store = ExpertStore(CheckpointReader(model_dir), dtype=torch.float32, cache_dense=dense, device=resolved)
    servicer = ExpertPoolServicer(store, pool_id, metrics)
    managed = ManagedServer([SERVICE_NAME], host, port)
    expert_pool_pb2_grpc.add_ExpertPoolServiceServicer_to_server(servicer, managed.server)  # before start
    servicer.draining = managed.draining
    await managed.start()
    await servicer.change_store(servicer.load, experts)
    await managed.set_serving()
    log.info("pool %s serving %d experts on %s", pool_id, len(experts), managed.address)
    return managed, servicer


async def serve(
    model_dir: Path,
    pool_id: str,
    experts: list[tuple[int, int]],
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int = 0,
    device: str = "cpu",
    dense_experts: bool = False,
) -> None:
    setup_tracing(f"expertmesh-pool-{pool_id}")
    metrics = PoolMetrics()
    serve_metrics(metrics_port, host)
    managed, servicer = await start_pool(model_dir, pool_id, experts, host, port, metrics, device, dense_experts)
    managed.stop_on_signals()
    print(f"READY {managed.address}", flush=True)
    await managed.wait_for_stop()
    servicer.compute.shutdown(wait=True)


def pool_argv(
    model_dir: str | Path,
    pool_id: str,
    redis_url: str,
    port: int,
    threads: int = 1,
    metrics_port: int = 0,
    device: str = "auto",
) -> list[str]:
    """The command line of a local pool process (for `expertmesh up` and the local actuator)."""
    return [
        sys.executable,
        "-m",
        "services.expert.server",
        "--model",
        str(model_dir),
        "--pool-id",
        pool_id,
        "--redis",
        redis_url,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--metrics-port",
        str(metrics_port),
        *(["--device", device] if device != "auto" else []),
    ]


def main(argv: list[str] | None = None) -> None:
    import argparse

    from services.state.placement_store import RedisPlacementStore, load_placement

    ap = argparse.ArgumentParser(description="expertmesh expert pool")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--pool-id", required=True)
    ap.add_argument("--redis", help="redis URL holding the placement (which experts this pool loads)")
    ap.add_argument("--placement", type=Path, help="placement JSON, when not read from Redis")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for expert compute")
    ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    ap.add_argument("--tls-dir", help="mutual TLS: ca.crt, tls.crt, tls.key (default $EXPERTMESH_TLS_DIR)")
    ap.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help=DEVICE_HELP + " On cuda the routed experts stay FP8 (block-scaled FP8 grouped GEMMs).",
    )
    ap.add_argument(
        "--dense-experts",
        action="store_true",
        help="Keep a dense fp32 copy of every held expert beside its FP8 bytes (CPU): 5x the memory, for large "
        "prefill batches (without, the CPU kernel reads the e4m3 bytes; kept anyway where it cannot convert them "
        "in hardware; BENCHMARKS.md, e4m3 weights).",
    )
    args = ap.parse_args(argv)
    try:
        resolve_device(args.device)  # a missing GPU is a one-line startup error, before Redis is read
    except DeviceUnavailableError as exc:
        sys.exit(f"expertmesh pool: {exc}")
    from services.errors import ExpertmeshError
    from services.rpc import tls

    try:
        tls.configure(args.tls_dir)
    except ExpertmeshError as exc:
        sys.exit(f"expertmesh pool: {exc}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.redis and RedisPlacementStore(args.redis).get() is None:
        experts = []  # a fresh cluster: the autoscaler's bootstrap (or a rollout) loads this pool's share
    else:
        try:
            experts = load_placement(args.redis, args.placement).experts_on(args.pool_id)
        except InvalidRequestError as exc:
            sys.exit(f"expertmesh pool: {exc}")
    torch.set_num_threads(max(1, args.threads))
    asyncio.run(
        serve(
            args.model, args.pool_id, experts, args.host, args.port, args.metrics_port, args.device, args.dense_experts
        )
    )


if __name__ == "__main__":
    main()
