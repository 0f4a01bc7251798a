"""`python -m services.rpc.health_probe HOST:PORT [SERVICE]`: exit 0 when the server reports SERVING, 1 otherwise.

For Kubernetes probes with mutual TLS on (the kubelet's own gRPC probe cannot present a client certificate):
it connects with the pod's certificate from $EXPERTMESH_TLS_DIR, as every channel of the platform does.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.rpc import tls


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m services.rpc.health_probe HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    try:
        with tls.channel(args[0]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args[1] if len(args) > 1 else ""), timeout=4
            )
    except grpc.RpcError as exc:
        print(f"{args[0]}: {exc.code().name}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{args[0]}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
