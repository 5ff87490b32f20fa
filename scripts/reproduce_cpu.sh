#!/usr/bin/env bash
# The paper's comparison at CPU scale (state observations), resumable: diffusion RL vs Gaussian RL vs
# demonstrations, per task, from the same DART-noised scripted demos (the stand-in for human demos) and equal budgets.
#
#   bash scripts/reproduce_cpu.sh                      # the default tasks, one after the other
#   bash scripts/reproduce_cpu.sh libero_object:0      # one task (suite:local id)
#
# Every step skips work whose output exists (and the phase scripts resume their own checkpoints and .partial
# files), so a killed study continues where it stopped. Outputs: study/{data,runs,results}/ (checkpoints and HDF5,
# not committed); per task, the committed summary is written by scripts/reproduction_report.py into
# docs/reproduction/. Budgets (environment variables): DEMOS, BC_STEPS, PPO_ITERS, EVAL_SEEDS, EVAL_EPISODES,
# MAX_EPISODES, STUDENT_DEMOS (a smoke run: DEMOS=3 BC_STEPS=50 PPO_ITERS=1 EVAL_SEEDS=0 EVAL_EPISODES=2
# MAX_EPISODES=4 STUDENT_DEMOS=2 STUDY_ROOT=/tmp/study bash scripts/reproduce_cpu.sh libero_object:0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${STUDY_ROOT:-study}
DEMOS=${DEMOS:-50}                   # demonstrations per source (DART and clean scripted) and RL trajectories
BC_STEPS=${BC_STEPS:-8000}           # BC gradient steps (batch 256), both policy classes and the students
PPO_ITERS=${PPO_ITERS:-80}           # PPO iterations of 2 envs x 105 chunks (x 8 actions): 134,400 env steps
EVAL_SEEDS=${EVAL_SEEDS:-"0 100 200 300"}  # 4 x 50 protocol episodes per checkpoint
EVAL_EPISODES=${EVAL_EPISODES:-50}
MAX_EPISODES=${MAX_EPISODES:-400}    # attempts allowed to collect DEMOS successes from a final policy
STUDENT_DEMOS=${STUDENT_DEMOS:-50}   # trajectories per source for the downstream student
FAST_EVAL=${FAST_EVAL:-1}            # 1: evaluate on libero_env's fast step (same success and length as stock, ~1.5x)
TASKS=("$@")
[ ${#TASKS[@]} -gt 0 ] || TASKS=(libero_object:0 libero_spatial:0 libero_object:1)
D=$ROOT/data R=$ROOT/runs E=$ROOT/results
export PYTHONUNBUFFERED=1
fast_eval=""
[ "$FAST_EVAL" = 1 ] && fast_eval="--fast-step"

step() { echo "=== [$(date +%H:%M:%S)] $*"; }
bc_recipe="--obs-mode state --denoiser mlp --batch-size 256 --lr 3e-4 --total-steps $BC_STEPS --eval-episodes 0"
ppo_budget="--num-envs 2 --num-steps 105 --num-iterations $PPO_ITERS --eval-every 20 --eval-episodes $EVAL_EPISODES"
# the study's schedule and deterministic (eta = 0) evaluation and collection, as committed in docs/reproduction.md
# (since then PPO's defaults changed: constant LR 1e-4, evaluation of the trained policy, time-limit critic)
ppo_budget="$ppo_budget --actor-lr 2e-5 --actor-lr-min 2e-6 --no-constant-lr --eval-mode eta0"

evaluate() {  # evaluate POLICY CKPT TAG SUITE ID: deterministic success over 4 seeds x 50 init states
  local policy=$1 ckpt=$2 tag=$3 suite=$4 id=$5
  for seed in $EVAL_SEEDS; do
    local out="$E/eval/${tag}_seed$seed/$suite/task$(printf %02d "$id").json"
    [ -f "$out" ] && continue
    $PY evaluate.py --policy "$policy" --ckpt "$ckpt" --suite "$suite" --task-id "$id" --num-episodes "$EVAL_EPISODES" \
      --seed "$seed" --tag "${tag}_seed$seed" --results-root "$E" $fast_eval | tail -1
  done
}

for spec in "${TASKS[@]}"; do
  suite=${spec%%:*} id=${spec##*:}
  nn=$(printf %02d "$id")
  name=$($PY -c "import libero_env as le; print(le.resolve_task('$suite', $id).name)" 2>/dev/null | tail -1)
  file() { echo "$D/$1/$suite/${name}_demo.hdf5"; }
  step "$suite $id: $name"
  budget="$E/budget/${suite}_task$nn.env"  # the budget this task's study started with (kept on resume)
  if [ ! -f "$budget" ]; then
    mkdir -p "$E/budget"
    printf 'DEMOS=%s\nBC_STEPS=%s\nPPO_ITERS=%s\nEVAL_SEEDS="%s"\nEVAL_EPISODES=%s\nMAX_EPISODES=%s\nSTUDENT_DEMOS=%s\n' \
      "$DEMOS" "$BC_STEPS" "$PPO_ITERS" "$EVAL_SEEDS" "$EVAL_EPISODES" "$MAX_EPISODES" "$STUDENT_DEMOS" >"$budget"
  fi

  # 1. demonstrations: DEMOS DART-noised (the BC start uses the first 10) and DEMOS clean, state mode
  [ -f "$(file scripted_dart)" ] || $PY collect.py --policy scripted --suite "$suite" --task-id "$id" \
    --obs-mode state --num-success "$DEMOS" --scripted-noise 0.3 --source scripted_dart --data-root "$D" --num-envs 2
  [ -f "$(file scripted)" ] || $PY collect.py --policy scripted --suite "$suite" --task-id "$id" \
    --obs-mode state --num-success "$DEMOS" --source scripted --data-root "$D" --num-envs 2

  # 2. BC warm starts (the same recipe and data for both policy classes), then PPO at an equal budget
  bc=$R/bc_diffusion/$suite/task${nn}__seed0/checkpoints/final.pt
  [ -f "$bc" ] || $PY bc_diffusion.py --suite "$suite" --task-id "$id" --demo-source scripted_dart --num-demos 10 \
    --data-root "$D" --run-root "$R" $bc_recipe
  ppo_d=$R/ppo_diffusion/$suite/task${nn}__seed0/checkpoints/final.pt
  [ -f "$ppo_d" ] || $PY ppo_diffusion.py --suite "$suite" --task-id "$id" --run-root "$R" $ppo_budget \
    --minibatch-size 525
  ppo_g=$R/ppo_gaussian/$suite/task${nn}__seed0/checkpoints/final.pt
  [ -f "$ppo_g" ] || $PY ppo_gaussian.py --suite "$suite" --task-id "$id" --obs-mode state \
    --demo-source scripted_dart --num-demos 10 --data-root "$D" --run-root "$R" --bc-steps "$BC_STEPS" \
    --bc-batch-size 256 --bc-lr 3e-4 $ppo_budget --minibatch-size 105  # 105 chunks = 525 pairs / 5 steps
  step "$suite $id: evaluation of BC starts and final policies"
  evaluate diffusion "$bc" diffusion_bc "$suite" "$id"
  evaluate diffusion "$ppo_d" diffusion_ppo "$suite" "$id"
  evaluate gaussian "${ppo_g%final.pt}bc.pt" gaussian_bc "$suite" "$id"
  evaluate gaussian "$ppo_g" gaussian_ppo "$suite" "$id"

  # 3. DEMOS successful trajectories of each final policy (deterministic, as evaluated), then data quality
  [ -f "$(file diffusion_rl)" ] || $PY collect.py --policy diffusion --ckpt "$ppo_d" --suite "$suite" \
    --task-id "$id" --obs-mode state --num-success "$DEMOS" --max-episodes "$MAX_EPISODES" --data-root "$D" || true
  [ -f "$(file gaussian_rl)" ] || $PY collect.py --policy gaussian --ckpt "$ppo_g" --suite "$suite" \
    --task-id "$id" --obs-mode state --num-success "$DEMOS" --max-episodes "$MAX_EPISODES" --data-root "$D" || true
  report="$E/analysis/${suite}_task$nn/metrics.json"
  if [ ! -f "$report" ]; then
    sources=()
    for s in scripted_dart scripted diffusion_rl gaussian_rl; do
      [ -f "$(file $s)" ] && sources+=("$s=$(file $s)")
    done
    $PY analyze.py --data "${sources[@]}" --report-name "${suite}_task$nn" --results-root "$E" \
      --figure-task "$($PY -c "import libero_env as le; print(le.resolve_task('$suite', $id).instruction)" | tail -1)"
  fi

  # 4. the downstream student: the same BC recipe on STUDENT_DEMOS trajectories of each source, evaluated alike
  for s in scripted_dart scripted diffusion_rl gaussian_rl; do
    [ -f "$(file $s)" ] || { echo "no $s data for $suite $id: its student is skipped"; continue; }
    student=$R/student_$s/bc_diffusion/$suite/task${nn}__seed0/checkpoints/final.pt
    [ -f "$student" ] || $PY bc_diffusion.py --suite "$suite" --task-id "$id" --demo-source "$s" \
      --num-demos "$STUDENT_DEMOS" --data-root "$D" --run-root "$R/student_$s" $bc_recipe
    evaluate diffusion "$student" "student_$s" "$suite" "$id"
  done
  step "$suite $id: done"
done
