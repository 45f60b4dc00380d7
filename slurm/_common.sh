# Shared by slurm/*.sbatch (sourced; not a job script). Submit from the repository root.
#
# - logs: the job's --output file, appended across requeues (--open-mode=append);
# - signals: the batch shell forwards USR1/TERM/INT to the job step, so --signal=B:USR1@N works
#   as well as --signal=USR1@N (every task) and a signal that reaches only the torchrun agent;
# - requeue: after the step ends, a marker written by the trainer (it stopped on a signal after
#   saving a checkpoint) makes the job requeue itself, up to MAX_REQUEUES times; the requeued job
#   resumes from that checkpoint (resume=auto). The decision never rests on the step's exit code:
#   torchrun reports any failed worker as 1.
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-python}
MAX_REQUEUES=${MAX_REQUEUES:-3}
export DDP_TRAINER_PREEMPT_MARKER=${DDP_TRAINER_PREEMPT_MARKER:-$PWD/.ddp_trainer/preempted-${SLURM_JOB_ID}}
rm -f "$DDP_TRAINER_PREEMPT_MARKER"
# torchrun: restarted rendezvous rounds need their own store (see README, SLURM)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# signals a torchrun agent forwards to its workers (stock torchrun leaves SIGUSR1 out)
TORCHRUN_SIGNALS="--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

echo "[slurm] job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) on ${SLURM_JOB_NODELIST}: SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} at $(date -Is)"

STEP_PID=""
REQUEUED=0
forward() {
  if [ "$REQUEUED" = 1 ]; then exit 0; fi  # the requeue's own SIGTERM
  echo "[slurm] batch shell got SIG$1 at $(date -Is); forwarding it to the job step"
  [ -n "$STEP_PID" ] && kill -"$1" "$STEP_PID" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT

# run_step CMD...: run the job step in the background (so that traps run), wait until it is gone
run_step() {
  "$@" &
  STEP_PID=$!
  local rc
  while true; do
    wait "$STEP_PID"
    rc=$?
    kill -0 "$STEP_PID" 2>/dev/null || break  # wait was cut short by a trapped signal
  done
  STEP_PID=""
  return "$rc"
}

# finish RC: requeue when the trainer stopped at a checkpoint, else exit with the step's status
finish() {
  local rc=$1
  if [ -f "$DDP_TRAINER_PREEMPT_MARKER" ]; then
    echo "[slurm] stopped at a checkpoint: $(cat "$DDP_TRAINER_PREEMPT_MARKER")"
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
      echo "[slurm] requeueing job ${SLURM_JOB_ID} (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of at most ${MAX_REQUEUES})"
      rm -f "$DDP_TRAINER_PREEMPT_MARKER"
      REQUEUED=1
      scontrol requeue "$SLURM_JOB_ID" || { echo "[slurm] scontrol requeue failed"; exit 3; }
      sleep 300 & wait $!  # slurm ends this shell (SIGTERM) as it requeues the job
      exit 0
    fi
    echo "[slurm] MAX_REQUEUES=${MAX_REQUEUES} reached; resubmit to continue (resume is automatic)"
    exit 3
  fi
  echo "[slurm] step finished with status $rc at $(date -Is)"
  exit "$rc"
}
