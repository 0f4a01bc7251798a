#!/usr/bin/env bash
# The README's main job (scripts/bootstrap.sh runs it after installing): the platform end to end on this machine.
#   1. the demo model, made once and cached in .cache/models/demo: a tiny DeepSeek-V3-architecture model trained
#      about a minute on the Python standard library's source (`expertmesh init-model --preset demo`);
#   2. `expertmesh up` with it: a private redis-server, 2 expert pools, the gateway (gRPC and the OpenAI-compatible
#      HTTP API on free ports), the autoscaler; its state and logs in .cache/expertmesh, never the user's own;
#   3. one completion request through the HTTP API, printed with its reply;
#   4. `expertmesh load top`: which experts served it, per pool;
#   5. everything stopped (SIGTERM to up, which stops its children), also when any step fails.
# Settings (environment): MAIN_JOB_CACHE (.cache), MAIN_JOB_PROMPT ("def fibonacci(n):"), MAIN_JOB_MAX_TOKENS (48),
# MAIN_JOB_READY_TIMEOUT_S (300: how long to wait for `up` to print "ready").
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
EXPERTMESH=.venv/bin/expertmesh
mkdir -p "${MAIN_JOB_CACHE:-.cache}"
CACHE=$(cd "${MAIN_JOB_CACHE:-.cache}" && pwd)  # absolute: up's children and `load top` read the same folder
MODEL=$CACHE/models/demo
PROMPT=${MAIN_JOB_PROMPT:-"def fibonacci(n):"}
MAX_TOKENS=${MAIN_JOB_MAX_TOKENS:-48}
READY_TIMEOUT_S=${MAIN_JOB_READY_TIMEOUT_S:-300}
export EXPERTMESH_HOME=$CACHE/expertmesh  # up.json and run logs: `load top` finds this deployment through it
mkdir -p "$EXPERTMESH_HOME"

echo "== 1. the demo model: a tiny DeepSeek-V3-architecture model trained on the Python standard library's source;"
echo "==    it completes Python-like text, nothing more"
if [ ! -f "$MODEL/config.json" ]; then
  rm -rf "$MODEL.partial"
  # OpenMP threads that sleep instead of spinning while they wait: on a machine busy with other work, spinning
  # threads slowed training twofold to fivefold here (2 cores: 1.4-1.7 s against 3.2-19 s per step)
  OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} "$EXPERTMESH" init-model "$MODEL.partial" --preset demo --seed 0
  rm -rf "$MODEL"
  mv "$MODEL.partial" "$MODEL"  # only a finished model is ever cached
  echo "cached in $MODEL"
else
  echo "cached in $MODEL"
fi

echo "== 2. expertmesh up --model $MODEL"
UP_LOG=$EXPERTMESH_HOME/main-job-up.log
UP_PID=""
stop_up() {  # SIGTERM: up drains the gateway, then stops the pools, the autoscaler and Redis; wait for all that
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    echo "== 5. stopping expertmesh up (pid $UP_PID)"
    kill -TERM "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" || true
    tail -n 1 "$UP_LOG"
  fi
  UP_PID=""
}
on_exit() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -f "$UP_LOG" ]; then
    echo "main job failed (exit $status); the end of up's output ($UP_LOG):" >&2
    tail -n 20 "$UP_LOG" >&2
  fi
  stop_up
  exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PYTHONUNBUFFERED=1 "$EXPERTMESH" up --model "$MODEL" --pools 2 --grpc-port 0 --http-port 0 >"$UP_LOG" 2>&1 &
UP_PID=$!
deadline=$((SECONDS + READY_TIMEOUT_S))
until grep -q '^ready' "$UP_LOG"; do
  if ! kill -0 "$UP_PID" 2>/dev/null; then
    echo "expertmesh up exited before it was ready" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "expertmesh up was not ready after ${READY_TIMEOUT_S} s" >&2
    exit 1
  fi
  sleep 0.5
done
cat "$UP_LOG"
HTTP=$(awk '$1 == "http" { print $2; exit }' "$UP_LOG")
[ -n "$HTTP" ] || { echo "expertmesh up printed no http endpoint" >&2; exit 1; }

echo "== 3. one completion through the OpenAI-compatible HTTP API at $HTTP"
"$PY" - "$HTTP" "$PROMPT" "$MAX_TOKENS" <<'PYEOF'
import json
import sys
import urllib.request

base, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])


def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as reply:
        return json.load(reply)


model = call("/models")["data"][0]["id"]
request = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
print(f"POST {base}/completions")
print(json.dumps(request, indent=2))
reply = call("/completions", request)
print("reply:")
print(json.dumps(reply, indent=2, ensure_ascii=False))
print("prompt and completion:")
print(prompt + reply["choices"][0]["text"])
PYEOF

echo "== 4. expertmesh load top (the routed tokens of that request, per expert and per pool)"
for _ in $(seq 1 20); do  # the gateway flushes its load counts to Redis every 0.25 s
  if "$EXPERTMESH" load top --json | "$PY" -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["experts"] else 1)'; then
    break
  fi
  sleep 0.5
done
"$EXPERTMESH" load top --limit 10

stop_up
echo "main job done: served the demo model (a tiny DeepSeek-V3-architecture model trained on Python source) through"
echo "the gateway and its expert pools"
