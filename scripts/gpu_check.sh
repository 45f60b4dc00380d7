#!/usr/bin/env bash
# Every GPU path of ddp_trainer proved in one short run on a machine with a CUDA GPU (one is enough;
# what one GPU cannot prove is listed in bench/GPU_RESULTS.md). One line per check:
#   PASS|FAIL|SKIP <check> (<seconds>s): <what it measured>
# each check under its own timeout, the whole run under a budget (default 470 s: with the kill grace, within 8 minutes; GPU_CHECK_BUDGET_S);
# logs and runs under OUT/<check>/, the summary in OUT/summary.txt. Without a GPU (nvidia-smi and
# torch both see none) it prints one SKIP line and exits 0; a GPU that nvidia-smi lists but torch
# does not see (a CPU build of torch, CUDA_VISIBLE_DEVICES) is a FAIL, not a SKIP.
#
#   scripts/gpu_check.sh [OUT]     (OUT defaults to $OUT, else a new temporary folder;
#                                   PYTHON picks the interpreter, default python3)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-${OUT:-$(mktemp -d -t gpu_check.XXXX)}}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILED=0
say() { echo "$*" | tee -a "$SUMMARY"; }

if ! "$PY" -c "import torch" > "$OUT/import.log" 2>&1; then
  say "FAIL preflight: $PY cannot import torch ($(tail -1 "$OUT/import.log")); set PYTHON to the interpreter that has it"
  exit 1
fi
NSMI=0
if command -v nvidia-smi > /dev/null; then
  NSMI=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU " || true)
fi
NTORCH=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NSMI" = 0 ] && [ "$NTORCH" = 0 ]; then
  say "SKIP gpu_check: no CUDA GPU visible (nvidia-smi lists none, torch.cuda.device_count() == 0)"
  exit 0
fi
say "gpu_check $(date -u +%FT%TZ): $NSMI GPU(s) listed by nvidia-smi, $NTORCH seen by torch; budget ${BUDGET_S}s; logs in $OUT"

# check NAME LIMIT_S: run scripts/gpu_checks.py NAME under its timeout and the remaining budget
check() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    FAILED=$((FAILED + 1))  # a check that never ran proves nothing: not a pass
    say "FAIL $name: not run, the budget of ${BUDGET_S}s is spent (GPU_CHECK_BUDGET_S)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 rc dt line
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$PY" scripts/gpu_checks.py "$name" "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  line=$(grep -a "^RESULT " "$OUT/$name.log" | tail -1 | cut -c8-)
  if [ "$rc" = 0 ]; then
    say "PASS $name (${dt}s): $line"
  else
    FAILED=$((FAILED + 1))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      say "FAIL $name (${dt}s): timed out after ${limit}s; log: $OUT/$name.log"
    else
      say "FAIL $name (${dt}s, exit $rc): ${line:-$(grep -a -i -m1 "error" "$OUT/$name.log" | cut -c1-300)}; log: $OUT/$name.log"
    fi
  fi
}

check preflight 60 --nvidia-smi-gpus "$NSMI"
check writers 60
check syncs 90
check ddp_features 120
check exact_resume 150
check fp16_scale 90
check commands 120
check throughput 90
check decode_device 60
check decode_device_resume 120
check decode_device_throughput 150
check compile_ddp 150
say "gpu_check: $FAILED check(s) failed in $(( $(date +%s) - START ))s; logs in $OUT"
exit $((FAILED > 0))
