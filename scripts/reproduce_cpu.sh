#!/usr/bin/env bash
# The paper's comparison at CPU scale (state observations), resumable: diffusion RL vs Gaussian RL vs
# demonstrations, per task, from the same DART-noised scripted demos (the stand-in for human demos) and equal budgets.
#
#   bash scripts/reproduce_cpu.sh                      # the four default tasks, one after the other
#   bash scripts/reproduce_cpu.sh libero_object:0      # one task (suite:local id)
#   SOURCES="diffusion_rl" bash scripts/reproduce_cpu.sh libero_goal:7   # one source of a task (one session's work)
#
# Each task is four sources, each run to its end before the next starts: the DART demos (the human stand-in) and the
# clean scripted expert, then each RL class: its teacher (scripts/convergence.sh: the converged recipe, 16 envs x 140
# chunks per iteration, actor LR 1e-4 held constant, PPO_ITERS iterations (83, 120 on LIBERO-Spatial 0: task_iters
# below), from the weak BC start on the first 10 DART demos; the Gaussian at the same budget with GAUSSIAN_LR), the
# evaluation of its BC start and final policy, DEMOS successful trajectories collected in the mode it is evaluated in
# (EVAL_MODE, `mean`: the trained chain without its noise), and for every source its data quality (analyze.py) and a
# state-mode BC student on STUDENT_DEMOS of its trajectories, evaluated over EVAL_SEEDS x EVAL_EPISODES protocol
# episodes.
#
# The small results (evaluation JSONs, data-quality metrics, the budget) are written to RESULTS, committed, so that
# a source finished in one session is not redone in the next, even on another machine; checkpoints and HDF5 stay under
# STUDY_ROOT and TEACHERS (convergence.sh's root, shared with docs/convergence.md: a teacher trained there is reused)
# and are not committed. Every step skips work whose output exists, and the phase scripts resume their own
# checkpoints and .partial files, so a killed study continues where it stopped. scripts/reproduction_report.py writes
# docs/reproduction.md from RESULTS and the teachers' exported metrics. Budgets (environment variables): DEMOS,
# BC_STEPS, PPO_ITERS, EVAL_SEEDS, EVAL_EPISODES, MAX_EPISODES, STUDENT_DEMOS (a smoke run: DEMOS=3 BC_STEPS=50
# PPO_ITERS=1 EVAL_SEEDS=0 EVAL_EPISODES=2 MAX_EPISODES=4 STUDENT_DEMOS=2 FINAL_EPISODES=2 RECIPE="--num-envs 2
# --num-steps 4 --minibatch-size 10" STUDY_ROOT=/tmp/study TEACHERS=/tmp/study RESULTS=/tmp/study/results EXPORT=""
# bash scripts/reproduce_cpu.sh libero_object:0; convergence.sh reads BC_STEPS, EVAL_EPISODES, FINAL_EPISODES, RECIPE,
# EXPORT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${STUDY_ROOT:-study}
TEACHERS=${TEACHERS:-convergence}    # convergence.sh's root: BC starts and PPO teachers (shared with its study)
E=${RESULTS:-docs/reproduction/results}  # the small results, committed
DEMOS=${DEMOS:-50}                   # demonstrations per source (DART and clean scripted) and RL trajectories
BC_STEPS=${BC_STEPS:-8000}           # BC gradient steps (batch 256) of the students (the BC starts: convergence.sh's 8000)
PPO_ITERS=${PPO_ITERS:-}             # PPO iterations of every task (16 envs x 140 chunks x 8 actions: 17,920 env steps)
task_iters() {  # PPO_ITERS unset: 83 (1.49M env steps), and 120 (2.15M) on LIBERO-Spatial 0, where three runs of the
  # recipe ended at 89.5, ~90 and 77.5 % at 83 (docs/convergence/findings.md)
  if [ -n "$PPO_ITERS" ]; then echo "$PPO_ITERS"; elif [ "$1" = libero_spatial:0 ]; then echo 120; else echo 83; fi
}
GAUSSIAN_LR=${GAUSSIAN_LR:-1e-4}     # the Gaussian's actor LR (tuned as the diffusion recipe's: docs/convergence.md)
EVAL_MODE=${EVAL_MODE:-mean}         # action mode of every diffusion evaluation and of the collection
EVAL_SEEDS=${EVAL_SEEDS:-"0 100 200 300"}  # 4 x 50 protocol episodes per checkpoint
EVAL_EPISODES=${EVAL_EPISODES:-50}
MAX_EPISODES=${MAX_EPISODES:-400}    # attempts allowed to collect DEMOS successes from a final policy
STUDENT_DEMOS=${STUDENT_DEMOS:-50}   # trajectories per source for the downstream student
LAYOUTS=${LAYOUTS:-protocol}         # where demos and RL trajectories start: the committed study ran before the layout
                                     # split, on the protocol's 50 init states (also its students' evaluation)
export LAYOUTS                       # convergence.sh's teachers train on the same
FAST_EVAL=${FAST_EVAL:-1}            # 1: evaluate on libero_env's fast step (same success and length as stock)
SOURCES=${SOURCES:-"scripted_dart scripted diffusion_rl gaussian_rl"}  # which sources of each task to run
TASKS=("$@")
[ ${#TASKS[@]} -gt 0 ] || TASKS=(libero_object:0 libero_object:1 libero_spatial:0 libero_goal:7)  # reproduction_report.py STUDY_TASKS
for s in $SOURCES; do  # bad input stops the study before any work
  case $s in scripted_dart | scripted | diffusion_rl | gaussian_rl) ;; *)
    echo "error: unknown source '$s' in SOURCES; use scripted_dart, scripted, diffusion_rl or gaussian_rl." >&2
    exit 2 ;;
  esac
done
budget_text() {  # budget_text SPEC: the budget a task's study runs with, as its RESULTS/budget file records it
  printf 'DEMOS=%s\nBC_STEPS=%s\nPPO_ITERS=%s\nEVAL_SEEDS="%s"\nEVAL_EPISODES=%s\nMAX_EPISODES=%s\nSTUDENT_DEMOS=%s\n' \
    "$DEMOS" "$BC_STEPS" "$(task_iters "$1")" "$EVAL_SEEDS" "$EVAL_EPISODES" "$MAX_EPISODES" "$STUDENT_DEMOS"
  printf 'GAUSSIAN_LR=%s\nEVAL_MODE=%s\n' "$GAUSSIAN_LR" "$EVAL_MODE"
}
for spec in "${TASKS[@]}"; do  # a task started with another budget is not continued with this one (mixed sources)
  budget="$E/budget/${spec%%:*}_task$(printf %02d "${spec##*:}").env"
  if [ -f "$budget" ] && [ "$(cat "$budget")" != "$(budget_text "$spec")" ]; then
    echo "error: $spec's study started with another budget ($budget: $(tr '\n' ' ' <"$budget")); rerun with that" \
      "budget, or move the task's results in $E aside to start it again." >&2
    exit 2
  fi
done
D=$ROOT/data R=$ROOT/runs
export PYTHONUNBUFFERED=1
fast_eval=""
[ "$FAST_EVAL" = 1 ] && fast_eval="--fast-step"

step() { echo "=== [$(date +%H:%M:%S)] $*"; }
bc_recipe="--obs-mode state --denoiser mlp --batch-size 256 --lr 3e-4 --total-steps $BC_STEPS --eval-episodes 0"

evaluated() {  # evaluated TAG: every evaluation seed of TAG on this task is in RESULTS
  local seed
  for seed in $EVAL_SEEDS; do [ -f "$E/eval/${1}_seed$seed/$suite/task$nn.json" ] || return 1; done
}

evaluate() {  # evaluate POLICY CKPT TAG: success in EVAL_MODE over the seeds x init states of this task
  local policy=$1 ckpt=$2 tag=$3 mode=$EVAL_MODE seed
  [ "$policy" = gaussian ] && mode=auto  # the Gaussian's mean (its checkpoint names it)
  for seed in $EVAL_SEEDS; do
    [ -f "$E/eval/${tag}_seed$seed/$suite/task$nn.json" ] && continue
    $PY evaluate.py --policy "$policy" --ckpt "$ckpt" --suite "$suite" --task-id "$id" --num-episodes "$EVAL_EPISODES" \
      --seed "$seed" --tag "${tag}_seed$seed" --results-root "$E" --action-mode "$mode" $fast_eval | tail -1
  done
}

analysed() { [ -f "$E/analysis/${suite}_task$nn/$1/metrics.json" ]; }

downstream() {  # downstream SOURCE: its data quality and its student, from its trajectories (skipped when done)
  local s=$1 student
  [ -f "$(file "$s")" ] || { analysed "$s" && evaluated "student_$s"; } ||
    { echo "no $s data for $suite $id: its analysis and student are skipped"; return 0; }
  analysed "$s" || $PY analyze.py --data "$s=$(file "$s")" --report-name "${suite}_task$nn/$s" --results-root "$E" \
    --no-figures | tail -1
  student=$R/student_$s/bc_diffusion/$suite/task${nn}__seed0/checkpoints/final.pt
  evaluated "student_$s" && return 0
  [ -f "$student" ] || $PY bc_diffusion.py --suite "$suite" --task-id "$id" --demo-source "$s" \
    --num-demos "$STUDENT_DEMOS" --data-root "$D" --run-root "$R/student_$s" $bc_recipe
  evaluate diffusion "$student" "student_$s"
}

for spec in "${TASKS[@]}"; do
  suite=${spec%%:*} id=${spec##*:}
  nn=$(printf %02d "$id") iters=$(task_iters "$spec")
  name=$($PY -c "import libero_env as le; print(le.resolve_task('$suite', $id).name)" 2>/dev/null | tail -1)
  file() { echo "$D/$1/$suite/${name}_demo.hdf5"; }
  step "$suite $id: $name"
  budget="$E/budget/${suite}_task$nn.env"  # the budget this task's study started with (checked above on resume)
  [ -f "$budget" ] || { mkdir -p "$E/budget" && budget_text "$spec" >"$budget"; }

  for s in $SOURCES; do
    case $s in
      scripted_dart | scripted)  # DEMOS demonstrations, state mode (DART: noise 0.3 executed, the expert's labels)
        noise=""
        [ "$s" = scripted_dart ] && noise="--scripted-noise 0.3"
        analysed "$s" && evaluated "student_$s" && { step "$suite $id: $s already done (in $E)"; continue; }
        [ -f "$(file "$s")" ] || $PY collect.py --policy scripted --suite "$suite" --task-id "$id" --obs-mode state \
          --num-success "$DEMOS" $noise --source "$s" --data-root "$D" --num-envs 2 --layouts "$LAYOUTS"
        ;;
      diffusion_rl | gaussian_rl)  # the teacher (same BC demos and budget for both classes), then its trajectories
        alg=${s%_rl}
        analysed "$s" && evaluated "student_$s" && evaluated "${alg}_bc" && evaluated "${alg}_ppo" &&
          { step "$suite $id: $s already done (in $E)"; continue; }
        step "$suite $id: $alg teacher"
        if [ "$alg" = diffusion ]; then
          CONV_ROOT=$TEACHERS ITERS=$iters GAUSSIAN="" ABLATION="" SEED=0 PY=$PY bash scripts/convergence.sh "$spec"
          bc=$TEACHERS/runs/bc_diffusion/$suite/task${nn}__seed0/checkpoints/final.pt
        else
          CONV_ROOT=$TEACHERS ITERS=$iters GAUSSIAN="$spec" GAUSSIAN_ONLY=1 GAUSSIAN_EXTRA="--actor-lr $GAUSSIAN_LR" \
            ABLATION="" SEED=0 PY=$PY bash scripts/convergence.sh "$spec"
        fi
        ppo=$TEACHERS/ppo/recipe/ppo_$alg/$suite/task${nn}__seed0/checkpoints/final.pt
        [ "$alg" = gaussian ] && bc=${ppo%final.pt}bc.pt  # ppo_gaussian.py keeps its BC start
        evaluate "$alg" "$bc" "${alg}_bc"
        evaluate "$alg" "$ppo" "${alg}_ppo"
        mode=()
        [ "$alg" = diffusion ] && mode=(--action-mode "$EVAL_MODE")
        [ -f "$(file "$s")" ] || $PY collect.py --policy "$alg" --ckpt "$ppo" --suite "$suite" --task-id "$id" \
          --obs-mode state "${mode[@]}" --num-success "$DEMOS" --max-episodes "$MAX_EPISODES" --data-root "$D" \
          --layouts "$LAYOUTS" || true
        ;;
    esac
    downstream "$s"
    step "$suite $id: $s done"
  done
  step "$suite $id: done"
done
