#!/usr/bin/env bash
# Install expertmesh into .venv (from nothing: Python 3.11 + pip) and run the main job.
# Usage: bash scripts/bootstrap.sh            install, then the main job (scripts/main_job.sh: train a tiny
#                                             demo model once, serve it, one completion over HTTP)
#        SKIP_MAIN_JOB=1 bash scripts/bootstrap.sh   install only
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: `expertmesh up` starts a private one, and the integration tests run against it
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip_install() {  # quiet pip; on failure print its log (less the index-location warnings) and stop
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2 || true
    exit 1
  fi
  rm -f "$log"
}
# torch first, pinned: the CPU wheel on this machine's disk (a plain `torch` would pull the CUDA build)
pip_install "torch==2.13.0"
pip_install -e ".[kernels,test]"
bash scripts/install_helm.sh >/dev/null  # the real helm binary, for the chart tests

if [ -z "${SKIP_MAIN_JOB:-}" ]; then
  bash scripts/main_job.sh  # the demo model (trained once, cached), served by `expertmesh up`, one HTTP completion
fi
