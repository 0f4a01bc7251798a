"""A gateway and two expert pools as real gRPC servers on 127.0.0.1, in this process (on an event loop thread):
faster to start than `expertmesh up`, for tests that talk to the services over the wire."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from services.expert.server import start_pool
from services.format.config import ModelConfig
from services.gateway.config import GatewayConfig
from services.gateway.runtime import GatewayRuntime
from services.state.placement import Placement, Pool


class InProcessDeployment:
    def __init__(self, model: Path, dispatch_dtype: str = "fp32", pools: int = 2, **gateway_options):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        cfg = ModelConfig.from_file(model)
        ids = [f"pool-{i}" for i in range(pools)]
        spread = Placement.spread(cfg, [Pool(i, "x") for i in ids])
        self.pools = []
        for pool_id in ids:
            managed, servicer = self.run(start_pool(model, pool_id, spread.experts_on(pool_id)))
            self.pools.append((managed, servicer))
        placement = Placement.spread(cfg, [Pool(i, m.address) for i, (m, _) in zip(ids, self.pools)])
        gateway_options.setdefault("http_port", -1)  # never the default 8000: tests run side by side
        config = GatewayConfig(model=model, grpc_port=0, dispatch_dtype=dispatch_dtype, **gateway_options)
        self.runtime = self.run(GatewayRuntime.start(config, placement))

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def gateway(self) -> str:
        return self.runtime.managed.address

    @property
    def pool_addresses(self) -> list[str]:
        return [m.address for m, _ in self.pools]

    def close(self) -> None:
        self.runtime.close()
        for managed in [self.runtime.managed, *(m for m, _ in self.pools)]:
            self.run(managed.server.stop(0))
        # the loop keeps running (a daemon thread): stopping it under grpc.aio's poller ends in EBADF at exit
