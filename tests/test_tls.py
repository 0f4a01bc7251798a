"""Mutual TLS (services/rpc/tls.py) with certificates from `expertmesh certs make`: a real pool server refuses a
plain-text client, a client without a certificate and one whose certificate another CA signed; a client with a
certificate from the deployment's CA is served. End to end: `expertmesh up --tls-dir` and `generate --target
--tls-dir`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.expert.server import start_pool
from services.rpc import tls
from services.rpc.certs import make_certs
from tests.local_deployment import UpProcess


@pytest.fixture
def tls_dirs(tmp_path, monkeypatch):
    """Two CAs' worth of certificates; TLS configured for this test only."""
    good, other = make_certs(tmp_path / "good"), make_certs(tmp_path / "other")
    monkeypatch.setenv(tls.TLS_DIR_ENV, str(good))
    tls.configure(None)
    yield good, other
    monkeypatch.delenv(tls.TLS_DIR_ENV)
    tls.configure(None)


def _health(channel) -> str:
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    except grpc.RpcError as err:
        return err.code().name


def test_pool_serves_only_peers_with_a_certificate_of_its_ca(tls_dirs, tiny_fp8):
    good, other = tls_dirs
    loop = asyncio.new_event_loop()
    managed, _ = loop.run_until_complete(start_pool(tiny_fp8, "pool-0", [(1, 0)]))
    try:
        address = managed.address

        def creds(ca_dir, cert_dir=None):
            read = lambda d, n: (d / n).read_bytes()  # noqa: E731
            if cert_dir is None:
                return grpc.ssl_channel_credentials(read(ca_dir, "ca.crt"))
            return grpc.ssl_channel_credentials(
                read(ca_dir, "ca.crt"), read(cert_dir, "tls.key"), read(cert_dir, "tls.crt")
            )

        results = {}

        async def check():
            for name, make in [
                ("ours", lambda: tls.aio_channel(address)),
                ("plain", lambda: grpc.aio.insecure_channel(address)),
                ("no client cert", lambda: grpc.aio.secure_channel(address, creds(good))),
                ("other CA's cert", lambda: grpc.aio.secure_channel(address, creds(good, other))),
            ]:
                async with make() as channel:
                    try:
                        reply = await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=5
                        )
                        results[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    except grpc.aio.AioRpcError as err:
                        results[name] = err.code().name

        loop.run_until_complete(check())
        assert results["ours"] == "SERVING"
        assert results["plain"] == results["no client cert"] == results["other CA's cert"] == "UNAVAILABLE", results

        def blocking():  # the blocking channel every service uses, while the server's loop runs
            with tls.channel(address) as channel:
                return _health(channel)

        assert loop.run_until_complete(asyncio.to_thread(blocking)) == "SERVING"
    finally:
        loop.run_until_complete(managed.server.stop(0))
        loop.close()


def test_missing_tls_files_are_named_and_change_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(tls.TLS_DIR_ENV, raising=False)
    from services.errors import ConfigError

    with pytest.raises(ConfigError, match="ca.crt"):
        tls.configure(tmp_path)
    assert tls.TLS_DIR_ENV not in os.environ and tls.tls_files() is None  # still plain text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_up_with_tls_end_to_end(tiny_fp8, tmp_path):
    certs = make_certs(tmp_path / "certs")
    up = UpProcess(tiny_fp8, pools=2, dispatch="fp32", home=tmp_path / "home", extra=["--tls-dir", str(certs)])
    try:
        cli = [
            sys.executable,
            "-m",
            "services.cli.app",
            "generate",
            "--target",
            up.gateway,
            "--tokens",
            "5,17,300",
            "--max-tokens",
            "4",
            "--json",
        ]
        env = {k: v for k, v in os.environ.items() if k != tls.TLS_DIR_ENV}
        secure = subprocess.run([*cli, "--tls-dir", str(certs)], capture_output=True, text=True, env=env, timeout=120)
        assert secure.returncode == 0, secure.stderr
        assert len(json.loads(secure.stdout)["token_ids"]) == 4
        plain = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
        assert plain.returncode == 2 and "UNAVAILABLE" in plain.stderr and "Traceback" not in plain.stderr
    finally:
        up.stop()


def test_health_probe_command_follows_serving_over_tls(tls_dirs, tiny_fp8):
    """The probe the chart runs when TLS is on: exit 1 while NOT_SERVING or unreachable, 0 once SERVING."""
    from expertmesh.v1 import gateway_pb2, gateway_pb2_grpc
    from services.gateway.grpc_servicer import SERVICE_NAME, GatewayServicer
    from services.rpc.grpc_server import ManagedServer
    from services.rpc.health_probe import main as probe

    async def serve():
        server = ManagedServer([SERVICE_NAME], "127.0.0.1", 0)  # made on the loop that runs it
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            GatewayServicer(gateway_pb2.GetModelInfoResponse()), server.server
        )
        await server.start()
        return server

    loop = asyncio.new_event_loop()
    managed = loop.run_until_complete(serve())
    try:
        check = lambda: loop.run_until_complete(asyncio.to_thread(probe, [managed.address, SERVICE_NAME]))  # noqa: E731
        assert check() == 1
        loop.run_until_complete(managed.set_serving())
        assert check() == 0
    finally:
        loop.run_until_complete(managed.server.stop(0))
        loop.close()
    assert probe(["127.0.0.1:1"]) == 1
