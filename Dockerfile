# The one image every expertmesh service runs from: gateway, expert pools, autoscaler, admin CLI.
# Not built in CI (the project's machines have no Docker engine); plain on purpose.
#   docker build -t ghcr.io/expertmesh/expertmesh:0.1.0 .
# CPU build by default; for NVIDIA GPUs pass a CUDA torch wheel index:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t ...:0.1.0-cuda .
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp

WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX" "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY kernels ./kernels
COPY services ./services
RUN pip install ".[kernels]" && python -c "import services.gateway.main, services.expert.server, services.autoscaler.service"

# non-root, read-only root filesystem friendly: writes go to /tmp (an emptyDir in the chart)
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp expertmesh
USER 10001:10001
EXPOSE 50051 50061 9090
ENTRYPOINT []
CMD ["expertmesh", "--help"]
