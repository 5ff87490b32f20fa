# Shared setup of the sbatch templates: sourced by each, run from the repository root (sbatch from there).
set -euo pipefail

# Headless rendering: EGL unless the user chose otherwise; the EGL device follows the GPU SLURM assigned
# (libero_env.configure_rendering applies the same rule when these are unset).
export MUJOCO_GL=${MUJOCO_GL:-egl}
export PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
if [ -z "${MUJOCO_EGL_DEVICE_ID:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  export MUJOCO_EGL_DEVICE_ID=${CUDA_VISIBLE_DEVICES%%,*}
fi
export WANDB_MODE=${WANDB_MODE:-offline}  # compute nodes often have no network; `wandb sync` later
export PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # progress lines in batch logs every 30 s, not 10 per second
PYTHON=${PYTHON:-python}
TASK_ID=${SLURM_ARRAY_TASK_ID:-${TASK_ID:-0}}
echo "job ${SLURM_JOB_ID:-local} task ${TASK_ID} on $(hostname) (restart ${SLURM_RESTART_COUNT:-0}) GPUs=${CUDA_VISIBLE_DEVICES:-none}"

# run CMD...: start the phase script in the background and forward SLURM's pre-emption warning
# (--signal=B:USR1@<s> reaches only this shell) and SIGTERM to it. Training scripts then write latest.pt and
# requeue the job themselves (exit 0); if the script instead died from the signal (collect, evaluate), this
# shell requeues. Either way the requeued job resumes (--resume auto / the collection's .partial).
# FORWARD_AS=TERM forwards USR1 as SIGTERM (torchrun passes SIGTERM, not USR1, to its workers).
run() {
  local preempted=0 status=0
  "$@" &
  local pid=$!
  trap 'preempted=1; kill -"${FORWARD_AS:-USR1}" "$pid" 2>/dev/null || true' USR1
  trap 'preempted=1; kill -TERM "$pid" 2>/dev/null || true' TERM
  while true; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break  # otherwise wait was interrupted by a trapped signal
  done
  if [ "$preempted" = 1 ] && [ "$status" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    scontrol requeue "${job:-$SLURM_JOB_ID}" && echo "pre-empted: requeued ${job:-$SLURM_JOB_ID}"
  fi
  return "$status"
}
