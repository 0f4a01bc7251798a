"""Remote routed experts: the experts seam over gRPC to expert pools.

Per MoE layer, each pool gets the tokens routed to any expert it hosts, each token once, with that token's
(expert, weight) pairs for the pool; all pools are called at once (futures on one channel per pool), every call
with a deadline; the BF16 (or fp32) partial sums that come back are added on the gateway.
"""

from __future__ import annotations

import threading
import time

import grpc
import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from expertmesh.v1 import expert_pool_pb2, expert_pool_pb2_grpc
from services.common import wire
from services.common.errors import PoolUnavailableError
from services.common.experts import Pending
from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.placement import Placement
from services.common.telemetry import tracer

DEFAULT_DEADLINE_S = 10.0


class RemoteExperts:
    def __init__(self, placement: Placement, n_routed_experts: int, dispatch_dtype: str = "fp8",
                 deadline_s: float = DEFAULT_DEADLINE_S):
        if dispatch_dtype not in wire.DISPATCH_DTYPES:
            raise ValueError(f"dispatch dtype must be one of {wire.DISPATCH_DTYPES}, got {dispatch_dtype!r}")
        self.dispatch_dtype = dispatch_dtype
        self.deadline_s = deadline_s
        self.n_routed_experts = n_routed_experts
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, expert_pool_pb2_grpc.ExpertPoolServiceStub] = {}
        self.bytes_sent = 0
        self.tokens_sent = 0
        self.set_placement(placement)

    def set_placement(self, placement: Placement) -> None:
        """Switch to a placement (between steps). Pool ids index a per-layer table: expert -> pool."""
        with self._lock:
            self.placement = placement
            self.pool_ids = sorted(placement.pools)
            index = {p: i for i, p in enumerate(self.pool_ids)}
            self.pool_of_expert = {layer: torch.tensor([index[placement.pools_for(layer, e)[0]] for e in range(len(experts))])
                                   for layer, experts in placement.replicas.items()}  # layer -> [E] pool index
            for pool_id, pool in placement.pools.items():
                if pool_id not in self._channels:
                    self._channels[pool_id] = grpc.insecure_channel(pool.address, options=CHANNEL_OPTIONS)
                    self._stubs[pool_id] = expert_pool_pb2_grpc.ExpertPoolServiceStub(self._channels[pool_id])

    def start(self, layer: int, hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> Pending:
        t, k = topk_idx.shape
        span = tracer().start_span("moe.dispatch", attributes={"expertmesh.layer": layer, "expertmesh.tokens": t})
        pool_of_pair = self.pool_of_expert[layer][topk_idx.reshape(-1)]  # [T*K]
        pair_token = torch.arange(t).repeat_interleave(k)  # [T*K]
        pair_expert = topk_idx.reshape(-1)
        pair_weight = topk_w.reshape(-1).to(torch.float32)
        calls = []
        deadline = time.monotonic() + self.deadline_s
        token = otel_context.attach(trace.set_span_in_context(span))  # pool calls become children of the dispatch
        try:
            for p in torch.unique(pool_of_pair).tolist():
                mask = pool_of_pair == p
                tokens = torch.unique(pair_token[mask])  # [N_p] the pool's tokens, each once
                local = torch.searchsorted(tokens, pair_token[mask])  # pair -> row in the pool's batch
                h, s = wire.encode_hidden(hidden[tokens], self.dispatch_dtype)
                request = expert_pool_pb2.ForwardRequest(
                    layer=layer, hidden=h, hidden_scale=s, pair_token=local.tolist(),
                    pair_expert=pair_expert[mask].tolist(), pair_weight=pair_weight[mask].tolist(),
                    response_dtype=wire.response_dtype(self.dispatch_dtype), placement_version=self.placement.version)
                self.bytes_sent += request.ByteSize()  # the whole message: activations, scales, pairs
                self.tokens_sent += tokens.numel()
                pool_id = self.pool_ids[p]
                calls.append((pool_id, tokens, self._stubs[pool_id].Forward.future(request, timeout=self.deadline_s)))
        finally:
            otel_context.detach(token)

        def wait() -> torch.Tensor:
            out = torch.zeros_like(hidden)
            try:
                for pool_id, tokens, future in calls:
                    try:
                        response = future.result(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
                    except grpc.RpcError as exc:
                        raise PoolUnavailableError(pool_id, f"{exc.code().name}: {exc.details()}") from None
                    except grpc.FutureTimeoutError:
                        raise PoolUnavailableError(pool_id, f"no answer within {self.deadline_s}s") from None
                    out.index_add_(0, tokens, wire.decode(response.partial, "partial").to(hidden.dtype))
            except BaseException:
                for _, _, future in calls:
                    future.cancel()
                raise
            finally:
                span.end()
            return out

        return wait

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
