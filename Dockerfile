# The one image every expertmesh service runs from: gateway, expert pools, autoscaler, admin CLI.
# Not built in CI (the project's machines have no Docker engine); plain on purpose. tests/test_image_env.py runs
# this file's pip lines into a fresh virtual environment and starts every entry point from it.
#
# DEVICE picks the torch wheel index (TORCH_INDEX, when set, overrides it):
#   cpu  (default): torch's CPU wheel from https://download.pytorch.org/whl/cpu; no Triton (CPU tensors take the
#                   plain-torch FP8 references)
#     docker build -t ghcr.io/expertmesh/expertmesh:0.1.0 .
#   cuda: torch's CUDA 12.8 wheel from https://download.pytorch.org/whl/cu128, plus the `kernels` extra (Triton)
#     docker build --build-arg DEVICE=cuda -t ghcr.io/expertmesh/expertmesh:0.1.0-cuda .
#     docker build --build-arg DEVICE=cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 ...
FROM python:3.11-slim-bookworm

ARG DEVICE=cpu
ARG TORCH_INDEX=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp

WORKDIR /app
# a C compiler: the CPU kernels (kernels/cpu/*.c: routed experts, attention) are built for the node's CPU when a
# pool or gateway starts (into $HOME/.cache, /tmp here), and Triton compiles its launcher with it on CUDA
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN case "$DEVICE" in \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index=https://download.pytorch.org/whl/cu128 ;; \
      *) echo "DEVICE must be cpu or cuda, not '$DEVICE'" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "${TORCH_INDEX:-$index}" "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY kernels ./kernels
COPY services ./services
# every entry point the chart starts, and what they import only when asked (the Kubernetes actuator, the local
# one, the CLI): a runtime dependency missing from pyproject's `dependencies` fails the build, not the pod
RUN if [ "$DEVICE" = cuda ]; then extras="[kernels]"; kernels="kernels.triton_fp8"; \
    else extras=""; kernels="kernels"; fi \
    && pip install ".$extras" \
    && python -c "import services.gateway.main, services.expert.server, services.autoscaler.service, \
services.autoscaler.kubernetes_actuator, services.autoscaler.local_actuator, services.cli.app, kubernetes.config, $kernels"

# non-root, read-only root filesystem friendly: writes go to /tmp (an emptyDir in the chart)
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp expertmesh
USER 10001:10001
EXPOSE 50051 50061 8000 9090
ENTRYPOINT []
CMD ["expertmesh", "--help"]
