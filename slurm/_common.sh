# Shared by slurm/*.sbatch (sourced; not a job script). Submit from the repository root.
#
# - logs: the job's --output file, appended across requeues (--open-mode=append);
# - signals: a stop signal that reaches the batch shell (--signal=B:USR1@N, scancel --batch) is sent
#   on to every process of the job step with scancel, never to srun itself (srun treats TERM and INT
#   as its own: it kills the step at once, or asks for a second Ctrl-C). SLURM's own routes
#   (--signal=USR1@N, a plain scancel, preemption) reach every process of the step directly.
#   A signal sent before the trainer handles signals (while torch imports) is sent again once it
#   does (the trainer writes "<marker>.ready").
# - which stop requeues: only SIGUSR1 (REQUEUE_SIGNAL), the warning before the time limit. SIGTERM
#   and SIGINT (scancel, Ctrl-C) stop at a checkpoint and end the job: a cancel means cancel.
# - requeue: after the step ends, the trainer's marker (it stopped on REQUEUE_SIGNAL, after saving a
#   checkpoint) makes the job requeue itself, up to MAX_REQUEUES times and only while it advances;
#   the requeued job resumes from that checkpoint (resume=auto). The decision rests on the marker,
#   not on the step's exit code.
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-python}
MAX_REQUEUES=${MAX_REQUEUES:-20}
REQUEUE_SIGNAL=${REQUEUE_SIGNAL:-SIGUSR1}
export DDP_TRAINER_PREEMPT_MARKER=${DDP_TRAINER_PREEMPT_MARKER:-$PWD/.ddp_trainer/preempted-${SLURM_JOB_ID}}
READY="${DDP_TRAINER_PREEMPT_MARKER}.ready"
LAST_STOP="${DDP_TRAINER_PREEMPT_MARKER}.last"  # the previous requeue's position: a requeue must advance
rm -f "$DDP_TRAINER_PREEMPT_MARKER" "$READY"
[ "${SLURM_RESTART_COUNT:-0}" = 0 ] && rm -f "$LAST_STOP"
# torchrun: restarted rendezvous rounds need their own store (see README, SLURM)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# torchrun as the scripts run it: its agent ignores the stop signals (SLURM gives them to every
# process of the step, the workers included; an agent that handled them would end a finished run
# with status 1 on a late warning, and print a traceback on every stop). HUP/QUIT stay torchrun's.
TORCHRUN=(bash -c 'trap "" USR1 TERM INT; exec "$@"' torchrun "$PYTHON" -m torch.distributed.run
          --signals-to-handle=SIGHUP,SIGQUIT)

echo "[slurm] job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) on ${SLURM_JOB_NODELIST}: SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} at $(date -Is)"

STEP_PID=""
REQUEUED=0
RESEND=""

# signal_step SIG: send SIG to every process of this job's running steps (not the batch shell)
signal_step() {
  local steps
  steps=$(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -E "^${SLURM_JOB_ID}\.[0-9]+$")
  [ -n "$steps" ] || return 1
  local s
  for s in $steps; do scancel --signal="$1" "$s" 2>/dev/null; done
}

forward() {
  if [ "$REQUEUED" = 1 ]; then exit 0; fi  # the requeue's own SIGTERM
  echo "[slurm] batch shell got SIG$1 at $(date -Is); sending it to the job step's processes"
  if [ -z "$STEP_PID" ] || ! signal_step "$1"; then
    echo "[slurm] no running job step to send SIG$1 to (yet)"
  fi
  [ -f "$READY" ] || RESEND=$1  # the trainer may not handle signals yet: send again when it does
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT

# run_step CMD...: run the job step in the background (so that traps run), wait until it is gone
run_step() {
  "$@" &
  STEP_PID=$!
  while kill -0 "$STEP_PID" 2>/dev/null; do
    if [ -n "$RESEND" ] && [ -f "$READY" ]; then
      echo "[slurm] the trainer handles signals now; sending SIG$RESEND again"
      signal_step "$RESEND"
      RESEND=""
    fi
    sleep 0.5 &
    wait $! 2>/dev/null  # returns early when a trapped signal arrives
  done
  wait "$STEP_PID"
  local rc=$?
  STEP_PID=""
  return "$rc"
}

# marker_field NAME: a field of the trainer's marker (one line of JSON)
marker_field() {
  sed -n "s/.*\"$1\": \"\{0,1\}\([^,\"}]*\)\"\{0,1\}[,}].*/\1/p" "$DDP_TRAINER_PREEMPT_MARKER"
}

# finish RC: requeue when the trainer stopped at a checkpoint on REQUEUE_SIGNAL, else end the job
finish() {
  local rc=$1
  if [ ! -f "$DDP_TRAINER_PREEMPT_MARKER" ]; then
    rm -f "$LAST_STOP"
    if [ "$rc" = 0 ]; then
      echo "[slurm] training finished at $(date -Is)"
    else
      echo "[slurm] step failed with status $rc at $(date -Is)"
    fi
    exit "$rc"
  fi
  local sig epoch step where
  sig=$(marker_field signal); epoch=$(marker_field epoch); step=$(marker_field step)
  where="epoch ${epoch}, step ${step}"
  rm -f "$DDP_TRAINER_PREEMPT_MARKER"
  if [ "$sig" != "$REQUEUE_SIGNAL" ]; then
    rm -f "$LAST_STOP"
    echo "[slurm] stopped by ${sig} at a checkpoint (${where}); not requeued: only ${REQUEUE_SIGNAL} requeues." \
         "Submit the job again to continue (resume=auto)"
    exit 3
  fi
  if [ -f "$LAST_STOP" ] && [ "$(cat "$LAST_STOP")" = "$where" ]; then
    echo "[slurm] stopped by ${sig} at ${where} again, without progress since the last requeue: not requeued" \
         "(is --time long enough to start and train?)"
    exit 3
  fi
  echo "[slurm] stopped by ${sig} at a checkpoint (${where})"
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    echo "[slurm] MAX_REQUEUES=${MAX_REQUEUES} reached; submit again to continue (resume is automatic)"
    exit 3
  fi
  echo "$where" > "$LAST_STOP"
  echo "[slurm] requeueing job ${SLURM_JOB_ID} (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of at most ${MAX_REQUEUES})"
  REQUEUED=1
  scontrol requeue "$SLURM_JOB_ID" || { echo "[slurm] scontrol requeue failed"; exit 3; }
  sleep 300 & wait $!  # slurm ends this shell (SIGTERM) as it requeues the job
  exit 0
}
