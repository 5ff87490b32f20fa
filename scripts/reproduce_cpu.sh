#!/usr/bin/env bash
# The paper's comparison at CPU scale (state observations), resumable: diffusion RL vs Gaussian RL vs
# demonstrations, per task, from the same DART-noised scripted demos (the stand-in for human demos) and equal budgets.
#
#   bash scripts/reproduce_cpu.sh                      # the four default tasks, one after the other
#   bash scripts/reproduce_cpu.sh libero_object:0      # one task (suite:local id)
#
# The teachers are trained by scripts/convergence.sh (the converged recipe: 16 envs x 140 chunks per iteration, actor
# LR 1e-4 held constant, PPO_ITERS iterations) for both policy classes at the same env-step budget, from the same
# weak BC starts (10 DART demos); the Gaussian with its own LR (GAUSSIAN_LR). They live under TEACHERS (default
# convergence/, convergence.sh's own root), so the teachers of docs/convergence.md are the study's and a run of either
# script reuses the other's (their small artefacts are exported to docs/convergence/ as convergence.sh does). Every policy is evaluated and its data
# collected in the mode the teacher is evaluated in (EVAL_MODE, `mean`: the trained chain without its noise).
# Every step skips work whose output exists (and the phase scripts resume their own checkpoints and .partial
# files), so a killed study continues where it stopped. Outputs: study/{data,runs,ppo,results}/ (checkpoints and HDF5,
# not committed); scripts/reproduction_report.py writes the committed summary into docs/reproduction/. Budgets
# (environment variables): DEMOS, BC_STEPS, PPO_ITERS, EVAL_SEEDS, EVAL_EPISODES, MAX_EPISODES, STUDENT_DEMOS (a
# smoke run: DEMOS=3 BC_STEPS=50 PPO_ITERS=1 EVAL_SEEDS=0 EVAL_EPISODES=2 MAX_EPISODES=4 STUDENT_DEMOS=2
# FINAL_EPISODES=2 RECIPE="--num-envs 2 --num-steps 4 --minibatch-size 10" STUDY_ROOT=/tmp/study TEACHERS=/tmp/study
# EXPORT="" bash scripts/reproduce_cpu.sh libero_object:0; convergence.sh reads BC_STEPS, EVAL_EPISODES,
# FINAL_EPISODES, RECIPE, EXPORT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${STUDY_ROOT:-study}
TEACHERS=${TEACHERS:-convergence}    # convergence.sh's root: BC starts and PPO teachers (shared with its study)
DEMOS=${DEMOS:-50}                   # demonstrations per source (DART and clean scripted) and RL trajectories
BC_STEPS=${BC_STEPS:-8000}           # BC gradient steps (batch 256) of the students (the BC starts: convergence.sh's 8000)
PPO_ITERS=${PPO_ITERS:-83}           # PPO iterations of 16 envs x 140 chunks (x 8 actions): 1,487,360 env steps
GAUSSIAN_LR=${GAUSSIAN_LR:-1e-4}     # the Gaussian's actor LR (tune it as the diffusion recipe's was tuned)
EVAL_MODE=${EVAL_MODE:-mean}         # action mode of every diffusion evaluation and of the collection
EVAL_SEEDS=${EVAL_SEEDS:-"0 100 200 300"}  # 4 x 50 protocol episodes per checkpoint
EVAL_EPISODES=${EVAL_EPISODES:-50}
MAX_EPISODES=${MAX_EPISODES:-400}    # attempts allowed to collect DEMOS successes from a final policy
STUDENT_DEMOS=${STUDENT_DEMOS:-50}   # trajectories per source for the downstream student
FAST_EVAL=${FAST_EVAL:-1}            # 1: evaluate on libero_env's fast step (same success and length as stock)
TASKS=("$@")
[ ${#TASKS[@]} -gt 0 ] || TASKS=(libero_object:0 libero_object:1 libero_spatial:0 libero_goal:8)
D=$ROOT/data R=$ROOT/runs E=$ROOT/results
export PYTHONUNBUFFERED=1
fast_eval=""
[ "$FAST_EVAL" = 1 ] && fast_eval="--fast-step"

step() { echo "=== [$(date +%H:%M:%S)] $*"; }
bc_recipe="--obs-mode state --denoiser mlp --batch-size 256 --lr 3e-4 --total-steps $BC_STEPS --eval-episodes 0"

evaluate() {  # evaluate POLICY CKPT TAG SUITE ID: success in EVAL_MODE over the seeds x init states
  local policy=$1 ckpt=$2 tag=$3 suite=$4 id=$5 mode=$EVAL_MODE
  [ "$policy" = gaussian ] && mode=auto  # the Gaussian's mean (its checkpoint names it)
  for seed in $EVAL_SEEDS; do
    local out="$E/eval/${tag}_seed$seed/$suite/task$(printf %02d "$id").json"
    [ -f "$out" ] && continue
    $PY evaluate.py --policy "$policy" --ckpt "$ckpt" --suite "$suite" --task-id "$id" --num-episodes "$EVAL_EPISODES" \
      --seed "$seed" --tag "${tag}_seed$seed" --results-root "$E" --action-mode "$mode" $fast_eval | tail -1
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
    printf 'GAUSSIAN_LR=%s\nEVAL_MODE=%s\n' "$GAUSSIAN_LR" "$EVAL_MODE" >>"$budget"
  fi

  # 1. demonstrations: DEMOS DART-noised (the BC start uses the first 10) and DEMOS clean, state mode
  [ -f "$(file scripted_dart)" ] || $PY collect.py --policy scripted --suite "$suite" --task-id "$id" \
    --obs-mode state --num-success "$DEMOS" --scripted-noise 0.3 --source scripted_dart --data-root "$D" --num-envs 2
  [ -f "$(file scripted)" ] || $PY collect.py --policy scripted --suite "$suite" --task-id "$id" \
    --obs-mode state --num-success "$DEMOS" --source scripted --data-root "$D" --num-envs 2

  # 2. the teachers: both policy classes with the converged recipe at the same budget, from the same BC data
  bc=$TEACHERS/runs/bc_diffusion/$suite/task${nn}__seed0/checkpoints/final.pt
  ppo_d=$TEACHERS/ppo/recipe/ppo_diffusion/$suite/task${nn}__seed0/checkpoints/final.pt
  ppo_g=$TEACHERS/ppo/recipe/ppo_gaussian/$suite/task${nn}__seed0/checkpoints/final.pt
  CONV_ROOT=$TEACHERS ITERS=$PPO_ITERS GAUSSIAN="$spec" GAUSSIAN_EXTRA="--actor-lr $GAUSSIAN_LR" ABLATION="" PY=$PY \
    bash scripts/convergence.sh "$spec"
  step "$suite $id: evaluation of BC starts and final policies"
  evaluate diffusion "$bc" diffusion_bc "$suite" "$id"
  evaluate diffusion "$ppo_d" diffusion_ppo "$suite" "$id"
  evaluate gaussian "${ppo_g%final.pt}bc.pt" gaussian_bc "$suite" "$id"
  evaluate gaussian "$ppo_g" gaussian_ppo "$suite" "$id"

  # 3. DEMOS successful trajectories of each final policy (in the mode it was evaluated in), then data quality
  [ -f "$(file diffusion_rl)" ] || $PY collect.py --policy diffusion --ckpt "$ppo_d" --suite "$suite" \
    --task-id "$id" --obs-mode state --action-mode "$EVAL_MODE" --num-success "$DEMOS" --max-episodes "$MAX_EPISODES" --data-root "$D" || true
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
