#!/usr/bin/env bash
# GPU checks for a machine with at least one CUDA GPU. One PASS/FAIL/SKIP line per check, with the
# value it measured. Without a GPU it prints one SKIP line with the reason and exits 0.
#
#   scripts/gpu_check.sh [OUT_DIR]        (PYTHON=... to pick the interpreter; default: python)
#
# Checks: DDP over nccl (torchrun, one process per GPU), DataParallel over the visible GPUs,
# bf16 and fp16 autocast (fp16 must checkpoint its grad scaler), torch.compile, a resume, and the
# training throughput of resnet18 on the demo data (images/s, global).
set -u
PY=${PYTHON:-python}
OUT=${1:-$(mktemp -d -t gpu_check.XXXX)}
cd "$(dirname "$0")/.."
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NGPU" = "0" ]; then
  echo "SKIP gpu_check: no CUDA GPU visible (torch.cuda.device_count() == 0)"
  exit 0
fi
echo "gpu_check $(date -u +%FT%TZ) on $($PY -c 'import torch; print(torch.cuda.get_device_name(0))') x$NGPU, torch $($PY -c 'import torch; print(torch.__version__)')"
COMMON=(data.root=demo train.epochs=1 data.num_workers=4 model.name=resnet18)
FAILED=0

row() {  # row DIR KEY... -> values of the last metrics row
  $PY - "$@" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
print(" ".join(f"{k}={rows[-1][k]:.4g}" if isinstance(rows[-1][k], float) else f"{k}={rows[-1][k]}" for k in sys.argv[2:]))
PY
}

check() {  # check NAME GREP_FOR_IN_LOG COMMAND...
  local name=$1 want=$2; shift 2
  local dir=$OUT/$name
  if "$@" output_dir="$dir" >"$OUT/$name.log" 2>&1 && grep -q -- "$want" "$OUT/$name.log"; then
    echo "PASS $name: $(row "$dir" val_acc images_per_s epoch_time_s)"
  else
    echo "FAIL $name: see $OUT/$name.log ($(grep -m1 'error:' "$OUT/$name.log"))"
    FAILED=$((FAILED + 1))
  fi
}

check ddp_nccl "backend=nccl" $PY -m torch.distributed.run --standalone --nproc_per_node="$NGPU" launch.py \
  "${COMMON[@]}" dist.mode=ddp dist.backend=nccl
check dataparallel "DataParallel over $NGPU GPUs" $PY launch.py "${COMMON[@]}" dist.mode=dp
check bf16 "launch:" $PY launch.py "${COMMON[@]}" dist.mode=single train.precision=bf16
check fp16 "launch:" $PY launch.py "${COMMON[@]}" dist.mode=single train.precision=fp16
if [ -f "$OUT/fp16/checkpoints/last.pt" ]; then
  $PY -c "import torch,sys; s=torch.load(sys.argv[1], weights_only=True)['scaler']; print('PASS fp16_scaler: scale=%g' % s['scale'] if s else 'FAIL fp16_scaler: no scaler state')" "$OUT/fp16/checkpoints/last.pt"
fi
check compile "launch:" $PY launch.py "${COMMON[@]}" dist.mode=single train.compile=true
$PY launch.py "${COMMON[@]}" dist.mode=single output_dir="$OUT/resume" >"$OUT/resume-first.log" 2>&1
check resume "resume: from" $PY launch.py "${COMMON[@]}" dist.mode=single resume=auto train.epochs=2
check throughput "launch:" $PY -m torch.distributed.run --standalone --nproc_per_node="$NGPU" launch.py \
  "${COMMON[@]}" data.image_size=64 data.batch_size=256 train.epochs=2
echo "gpu_check: $FAILED check(s) failed; logs in $OUT"
exit $((FAILED > 0))
