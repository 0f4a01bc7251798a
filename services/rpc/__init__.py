"""RPC plumbing: gRPC servers, the error-to-status mapping, health, draining, telemetry, metrics, local processes."""
