#!/usr/bin/env bash
# The GPU check: one script, one CUDA GPU, under 8 minutes (each step has a time limit; 470 s in all).
#
#   bash scripts/gpu_check.sh            # on a machine with a CUDA GPU (an H100/H200-class one: FP8 needs sm_89+)
#   bash scripts/gpu_check.sh --dry-run  # the same Python on CPU in a few minutes: kernels under TRITON_INTERPRET=1,
#                                        # parity of the CPU emulation of the CUDA path, benchmarks on tiny sizes
#
# Steps: (a) preflight (torch sees the GPU, triton, redis-server); (b) the kernel tests compiled by Triton
# (TRITON_INTERPRET unset); (c) parity of the engine on the device against the CPU engine in float32 on fresh
# tiny and small models: bfloat16 with FP8 experts (max and mean |logprob diff|, top-1 agreement, thresholds
# below) and float32 on the device (exact experts: tight threshold); (d) benchmarks/bench_engine.py and
# benchmarks/bench_distributed.py with --device cuda. Every step runs even when one before failed; the report
# (REPORT, default gpu_check_report.md) lists each step's status and figures and is printed at the end; the exit
# status is 1 when any step failed, with the tail of that step's log on stderr. PYTHON picks the interpreter
# (default .venv/bin/python, else python3); it needs the project's dependencies with a CUDA build of torch
# (pip install -e '.[test]', then torch from a CUDA index) and redis-server on the PATH.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=$(command -v python3)
REPORT=${REPORT:-gpu_check_report.md}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
BUDGET_S=470
STARTED=$(date +%s)
FAILED=()

if [[ $DRY_RUN == 1 ]]; then
  DEVICE=cpu PRESETS=tiny
  export TRITON_INTERPRET=1
  ENGINE_BENCH=(--preset tiny --batches 1,4 --new-tokens 4 --repeats 1 --dtypes float32)
  DIST_BENCH=(--preset tiny --concurrency 1,32 --new-tokens 8 --repeats 1)  # dispatch_bytes needs 32 prompts cached
else
  DEVICE=cuda PRESETS=tiny,small
  unset TRITON_INTERPRET
  ENGINE_BENCH=(--preset small --batches 1,8,32 --new-tokens 16 --repeats 2 --dtypes bfloat16)
  DIST_BENCH=(--preset small --concurrency 1,8,32 --new-tokens 32 --repeats 1)
fi

# step NAME LIMIT_S COMMAND...: run with a time limit (never past the budget), log to $WORK/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - STARTED)))
  ((limit > left)) && limit=$left
  local t0=$(date +%s) rc=0
  echo "== $name (limit ${limit}s)"
  if ((limit < 5)); then
    echo "no time left in the ${BUDGET_S}s budget" > "$WORK/$name.log"
    rc=124
  else
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$WORK/$name.log" 2>&1 || rc=$?
  fi
  local took=$(($(date +%s) - t0))
  if ((rc == 0)); then
    echo "$name: ok (${took}s)" | tee -a "$WORK/status"
  else
    echo "$name: FAILED (exit $rc$( ((rc == 124)) && echo ', time limit'), ${took}s)" | tee -a "$WORK/status"
    FAILED+=("$name")
    echo "---- last lines of $name ----" >&2
    tail -n 30 "$WORK/$name.log" >&2
  fi
}

preflight() {
  "$PY" - "$DEVICE" <<'PY'
import shutil, subprocess, sys
import torch, triton
device = sys.argv[1]
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
if device == "cuda":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    cap = torch.cuda.get_device_capability()
    print(f"GPU: {torch.cuda.get_device_name()} sm_{cap[0]}{cap[1]}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    assert cap >= (8, 9), "e4m3 tl.dot needs sm_89 or newer"
redis = shutil.which("redis-server")
assert redis, "redis-server is not installed (bench_distributed's expertmesh up needs one): apt-get install redis-server"
print(subprocess.run([redis, "--version"], capture_output=True, text=True).stdout.strip())
PY
}

parity() {
  "$PY" - "$DEVICE" "$PRESETS" "$WORK" <<'PY'
"""The engine on the device against the CPU engine in float32, on fresh models (bench_engine's cache layout)."""
import json, sys, time
from pathlib import Path
import torch
from services.format.model_writer import write_random_model
from services.format.presets import preset_config
from services.gateway.engine import Engine

device, presets, work = sys.argv[1], sys.argv[2].split(","), Path(sys.argv[3])
# bfloat16 with FP8 experts (activations e4m3 before every expert GEMM) against float32: measured with the CPU
# emulation of this path (--dry-run) at max 2.2 / mean 0.08 (tiny), max 1.0 / mean 0.13 (small); the maxima
# come from positions whose routing flips. float32 on the device: experts dequantized, TF32 off (torch's default).
LIMITS = {"bfloat16": {"max": 4.0, "mean": 0.35, "top1": 0.9}, "float32": {"max": 2e-2, "mean": 2e-3, "top1": 0.99}}
SEQS, LEN = 4, 64

def scores(engine, seqs):
    out = [engine.score(s, top_k=1)[1:] for s in seqs]
    return torch.tensor([[p.logprob for p in r] for r in out]), torch.tensor([[p.top[0][0] for p in r] for r in out])

results, ok = [], True
for preset in presets:
    cfg = preset_config(preset)
    model = work / "bench" / f"{preset}-fp8"
    write_random_model(model, cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, cfg.vocab_size, (LEN,), generator=g).tolist() for _ in range(SEQS)]
    ref_lp, ref_top = scores(Engine.from_dir(model, device="cpu", cache_tokens=4096, block_size=16), seqs)
    for dtype in (torch.bfloat16, torch.float32):
        t0 = time.time()
        # on cpu (--dry-run) the CUDA path is emulated: FP8 experts through the kernels' torch references
        engine = Engine.from_dir(model, device=device, dtype=dtype, cache_tokens=4096, block_size=16,
                                 fp8_experts=True)
        store = engine.core.model.experts.store
        lp, top = scores(engine, seqs)
        diff = (lp - ref_lp).abs()
        name = str(dtype).removeprefix("torch.")
        row = {"preset": preset, "device": device, "dtype": name, "max_abs_logprob_diff": diff.max().item(),
               "mean_abs_logprob_diff": diff.mean().item(), "top1_agreement": (top == ref_top).float().mean().item(),
               "expert_bytes": store.nbytes(), "dense_expert_copies": len(store._dense) + len(store._stacks),
               "fp8_stacks": len(store._fp8_stacks), "seconds": round(time.time() - t0, 1)}
        if device == "cuda":
            row["max_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        lim = LIMITS[name]
        row["pass"] = (row["max_abs_logprob_diff"] <= lim["max"] and row["mean_abs_logprob_diff"] <= lim["mean"]
                       and row["top1_agreement"] >= lim["top1"]
                       and (dtype == torch.float32 or (row["fp8_stacks"] > 0 and row["dense_expert_copies"] == 0)))
        ok &= row["pass"]
        results.append(row)
        print(json.dumps(row))
        del engine, store
        if device == "cuda":
            torch.cuda.empty_cache()
(work / "parity.json").write_text(json.dumps({"limits": LIMITS, "rows": results}, indent=2))
sys.exit(0 if ok else 1)
PY
}

kernel_tests() {
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
}

export -f preflight parity kernel_tests
export PY DEVICE PRESETS WORK
step preflight 30 preflight
step kernels 120 kernel_tests
step parity 130 parity
# the benchmarks reuse parity's fresh small model (same cache layout)
step bench_engine 100 "$PY" benchmarks/bench_engine.py --device "$DEVICE" --cache-dir "$WORK/bench" \
  --json "$WORK/bench_engine.json" "${ENGINE_BENCH[@]}"
step bench_distributed 160 "$PY" benchmarks/bench_distributed.py --device "$DEVICE" --cache-dir "$WORK/bench" \
  "${DIST_BENCH[@]}"

{
  echo "# expertmesh GPU check ($([[ $DRY_RUN == 1 ]] && echo 'dry run on CPU' || echo "$DEVICE"))"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
       "$(($(date +%s) - STARTED)) s in all"
  echo
  sed -n '1,20p' "$WORK/preflight.log" | sed 's/^/    /'
  echo
  echo "## Steps"
  echo
  sed 's/^/- /' "$WORK/status"
  echo
  echo "## Parity against the CPU engine in float32"
  echo
  if [[ -f "$WORK/parity.json" ]]; then
    "$PY" - "$WORK/parity.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
print("| preset | device | dtype | max abs logprob diff | mean | top-1 agreement | expert bytes | dense copies | pass |")
print("|---|---|---|---|---|---|---|---|---|")
for r in data["rows"]:
    print(f"| {r['preset']} | {r['device']} | {r['dtype']} | {r['max_abs_logprob_diff']:.4g} | "
          f"{r['mean_abs_logprob_diff']:.4g} | {r['top1_agreement']:.3f} | {r['expert_bytes']} | "
          f"{r['dense_expert_copies']} | {'yes' if r['pass'] else 'NO'} |")
print("\nlimits:", json.dumps(data["limits"]))
PY
  else
    echo "(no parity figures: see the step's status)"
  fi
  for bench in bench_engine bench_distributed; do
    echo
    echo "## $bench"
    echo
    grep -E '^(\||preset|every run|wire bytes)' "$WORK/$bench.log" 2>/dev/null || echo "(no figures: see the step's status)"
  done
} > "$REPORT"
cat "$REPORT"

if ((${#FAILED[@]})); then
  echo "GPU CHECK FAILED: ${FAILED[*]} (report: $REPORT)" >&2
  exit 1
fi
echo "GPU check passed (report: $REPORT)"
