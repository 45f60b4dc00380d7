#!/usr/bin/env bash
# Clean exits, counted: runs tests/helpers/ddp_step.py N times under torchrun (2 gloo processes) and
# counts the runs in which a process aborted at exit (SIGABRT, "terminate called ..."). The suite
# runs the same helper 3 times (tests/test_clean_exit.py); this is the many-run count behind it.
#   bash bench/aborts.sh [N=100]      (PY=... picks the interpreter; default: python3 on PATH)
set -u
N=${1:-100}
PY=${PY:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
aborts=0 nonzero=0
for i in $(seq "$N"); do
  out=$(cd "$ROOT" && OMP_NUM_THREADS=1 PYTHONPATH="$ROOT" timeout 120 "$PY" -m torch.distributed.run \
        --standalone --nproc_per_node=2 --monitor-interval=0.2 tests/helpers/ddp_step.py "$TMP/w$i.pt" 8 2 3 2>&1)
  rc=$?
  if grep -q "terminate called\|Signal 6\|SIGABRT\|exitcode  : -6" <<<"$out"; then aborts=$((aborts + 1)); fi
  [ "$rc" != 0 ] && nonzero=$((nonzero + 1))
done
echo "runs=$N aborts=$aborts nonzero_exit=$nonzero"
