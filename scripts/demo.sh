#!/usr/bin/env bash
# `make demo`: the whole pipeline at a small default on one LIBERO-Object task, on a CPU (~15 min on 2 cores).
#
#   scripted demos -> BC (diffusion policy) -> a few PPO iterations -> collect with the PPO policy
#   -> a tiny from-scratch pi0 fine-tune -> evaluate -> analyze -> summary table
#
# Every phase is its script's real CLI with small budgets; artefacts go under $DEMO_ROOT (default demo/):
# runs/ (checkpoints, metrics.jsonl), data/ (HDF5), results/ (evaluation JSON, analysis report and figures).
# BC and PPO use --obs-mode state (LIBERO's object state, no rendering) to fit a CPU budget, with the demos
# executed under DART noise (their stored labels are the expert's noise-free actions); the RL data is
# collected with camera images for pi0. The pi0 here is randomly initialised and tiny: a smoke test of the
# fine-tuning pipeline, not a VLA (see README for the real recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${DEMO_ROOT:-demo}
TASK=(--suite libero_object --task-id 0)
DIRS=(--run-root "$ROOT/runs" --data-root "$ROOT/data")
export MUJOCO_GL=${MUJOCO_GL:-egl} WANDB_MODE=${WANDB_MODE:-disabled} TQDM_MININTERVAL=${TQDM_MININTERVAL:-5}
start=$(date +%s)

phase() {
  echo
  echo "=== [$(( $(date +%s) - start ))s] $1"
  shift
  echo "+ $*"
  "$@"
}

phase "1/8 scripted demonstrations (privileged expert with DART noise, 20 successes)" \
  "$PY" collect.py --policy scripted "${TASK[@]}" --num-success 20 --max-episodes 60 --obs-mode state \
  --scripted-noise 0.3 "${DIRS[@]}"
phase "2/8 BC warm start of the diffusion policy (MLP denoiser: the fast recipe on a CPU, README \"Checks\")" \
  "$PY" bc_diffusion.py "${TASK[@]}" --obs-mode state --demo-source scripted --denoiser mlp --batch-size 256 \
  --lr 3e-4 --total-steps 8000 --eval-every 0 --eval-episodes 20 --log-every 500 "${DIRS[@]}"
phase "3/8 PPO on the denoising chain (3 iterations)" \
  "$PY" ppo_diffusion.py "${TASK[@]}" --num-envs 2 --num-steps 40 --num-iterations 3 --critic-warmup-iters 1 \
  --minibatch-size 100 --update-epochs 4 --eval-episodes 20 --eval-every 0 --final-eval-episodes 0 \
  --run-root "$ROOT/runs"
VLA_DATA="$ROOT/data/diffusion_rl"
if ! phase "4/8 collect with the PPO policy (camera images for pi0)" \
  "$PY" collect.py --policy diffusion "${TASK[@]}" --num-success 5 --max-episodes 20 --image-size 128 "${DIRS[@]}"; then
  # At this CPU budget BC (and so PPO) may not succeed yet (README: "Checks"); keep the rest of the pipeline
  # running on scripted demos with images, and say so.
  echo "!!! the PPO policy did not succeed 5 times in 20 episodes: pi0 trains on scripted demos instead"
  VLA_DATA="$ROOT/data/scripted_rgb"
  phase "4b/8 scripted demos with camera images for pi0 (fallback)" \
    "$PY" collect.py --policy scripted "${TASK[@]}" --num-success 5 --image-size 128 --source scripted_rgb "${DIRS[@]}"
fi
phase "5/8 a tiny, randomly initialised pi0 fine-tuned on the collected data (pipeline smoke test, not a VLA)" \
  "$PY" finetune_vla.py --config-only tiny --data "$VLA_DATA" --exp-name demo_tiny_pi0 --image-size 64 \
  --total-steps 60 --batch-size 4 --warmup-steps 10 --lr 1e-3 --lr-min 1e-4 --log-every 20 --num-workers 0 \
  --run-root "$ROOT/runs"
phase "6/8 evaluate the PPO policy (LIBERO protocol, 20 init states)" \
  "$PY" evaluate.py --policy diffusion "${TASK[@]}" --num-episodes 20 --run-root "$ROOT/runs" --results-root "$ROOT/results"
phase "7/8 evaluate the tiny pi0 (2 episodes)" \
  "$PY" evaluate.py --policy vla --ckpt "$ROOT/runs/finetune_vla/demo_tiny_pi0__seed0/checkpoints/final" \
  "${TASK[@]}" --num-episodes 2 --results-root "$ROOT/results"
phase "8/8 data quality: scripted vs diffusion-RL data" \
  "$PY" analyze.py --sources scripted diffusion_rl --suite libero_object --data-root "$ROOT/data" \
  --results-root "$ROOT/results" --report-name demo
echo
echo "=== [$(( $(date +%s) - start ))s] summary"
"$PY" scripts/demo_summary.py "$ROOT" "$(( $(date +%s) - start ))"
