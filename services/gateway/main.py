"""`python -m services.gateway.main`: the gateway process. Flags come from GatewayConfig's fields."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import torch

from services.errors import ExpertmeshError, InvalidRequestError
from services.gateway.config import GatewayConfig
from services.gateway.runtime import GatewayRuntime
from services.rpc import tls
from services.rpc.metrics import GatewayMetrics, serve_metrics
from services.rpc.telemetry import setup_tracing
from services.settings import add_flags, from_flags
from services.state.placement import Placement
from services.state.placement_store import load_placement


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh-gateway", description="expertmesh gateway")
    add_flags(parser, GatewayConfig, required=("model",))
    return parser


def parse_config(argv: list[str] | None = None) -> GatewayConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return from_flags(GatewayConfig, args)
    except ValueError as exc:
        parser.error(str(exc))


def wait_for_placement(config: GatewayConfig) -> Placement:
    """On a fresh cluster the autoscaler publishes the first placement once the pools serve: wait for it."""
    deadline = time.monotonic() + config.placement_wait_s
    while True:
        try:
            return load_placement(config.redis, config.placement)
        except InvalidRequestError as exc:
            if not config.redis or time.monotonic() > deadline:
                sys.exit(f"expertmesh gateway: {exc}")
            time.sleep(1.0)


async def serve(config: GatewayConfig, placement: Placement) -> None:
    setup_tracing("expertmesh-gateway")
    metrics = GatewayMetrics()
    serve_metrics(config.metrics_port, config.host)
    runtime = await GatewayRuntime.start(config, placement, metrics, require_http=True)
    runtime.stop_on_signals()
    http = f" http={runtime.http.address}" if runtime.http else ""
    print(f"READY {runtime.managed.address}{http}", flush=True)
    await runtime.wait_for_stop()
    runtime.close()


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    try:
        tls.configure(config.tls_dir)
    except ExpertmeshError as exc:
        sys.exit(f"expertmesh gateway: {exc}")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(serve(config, wait_for_placement(config)))
    except ExpertmeshError as exc:  # a startup error that names what is wrong (device, checkpoint, config)
        sys.exit(f"expertmesh gateway: {exc}")


if __name__ == "__main__":
    main()
