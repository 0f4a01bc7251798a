#!/usr/bin/env bash
# Regenerate the committed Python stubs next to the .proto files (grpcio-tools, pinned in the test extra).
# tests/test_protos.py checks that a fresh generation equals what is committed.
set -euo pipefail
cd "$(dirname "$0")/../protos"
PY=${PYTHON:-../.venv/bin/python}
"$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. expertmesh/v1/*.proto
