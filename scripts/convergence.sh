#!/usr/bin/env bash
# Convergence of diffusion PPO from weak BC starts, on this CPU (state observations), resumable.
#
#   bash scripts/convergence.sh                        # the three tasks, then the Gaussian baseline on the first
#   bash scripts/convergence.sh libero_object:1        # one task (suite:local id)
#   GAUSSIAN_ONLY=1 bash scripts/convergence.sh libero_object:0   # only the Gaussian baseline of that task
#   ABLATION=lr3e-4 EXTRA="--actor-lr 3e-4" bash scripts/convergence.sh libero_object:0   # one recipe variation
#   SEED=1 bash scripts/convergence.sh libero_spatial:0  # another PPO seed of the recipe (ablation "seed1")
#   BC_ONLY=1 bash scripts/convergence.sh libero_goal:0 libero_goal:1   # only the BC starts and their evaluation
#                                                    # (50 episodes, mean and eta0): to choose a task by its start
#   GAUSSIAN_ONLY=1 ABLATION=Glr3e-4 GAUSSIAN_EXTRA="--actor-lr 3e-4" bash scripts/convergence.sh libero_object:0
#                                                    # a variation of the Gaussian baseline (its LR tuning)
#
# Per task: 10 DART-noised scripted demos (the human stand-in), the study's weak BC start (MLP denoiser, 8000 steps),
# then ppo_diffusion.py with the CPU recipe below for ITERS iterations; in-run evaluations every EVAL_EVERY
# iterations (50 protocol episodes, in the evaluated mode and in eta0) and at the end every action mode over the same
# 200 episodes (final_eval.json). Every step skips work whose output exists and the phase scripts resume their own
# checkpoints, so a killed study continues where it stopped. Checkpoints and HDF5 stay under $CONV_ROOT (not
# committed); the small artefacts (args, metrics, final evaluation, timing) are copied to $EXPORT (docs/convergence/) for
# scripts/convergence_report.py, which writes docs/convergence.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${CONV_ROOT:-convergence}
ITERS=${ITERS:-83}                   # PPO iterations x 17,920 env steps (16 envs x 140 chunks x 8) = 1.49M: the goal's budget
EVAL_EVERY=${EVAL_EVERY:-10}
EVAL_EPISODES=${EVAL_EPISODES:-50}   # protocol episodes of each in-run evaluation
BC_STEPS=${BC_STEPS:-8000}           # the weak BC starts' gradient steps (both policy classes)
EXPORT=${EXPORT-docs/convergence}    # where the small artefacts go for the report ("" to keep them in the run dirs)
FINAL_EPISODES=${FINAL_EPISODES:-200}
ABLATION=${ABLATION:-}               # name of a recipe variation (EXTRA flags); results under docs/convergence/ablations
EXTRA=${EXTRA:-}
SEED=${SEED:-0}                      # PPO seed (rollout draws, evaluation noise); the BC start stays seed 0's
[ "$SEED" = 0 ] || ABLATION=${ABLATION:-seed$SEED}  # another seed's run is reported beside the recipe's, not over it
GAUSSIAN=${GAUSSIAN-libero_object:0}  # task(s) the Gaussian baseline runs on at the same budget ("" to skip)
GAUSSIAN_EXTRA=${GAUSSIAN_EXTRA:-}
GAUSSIAN_MINIBATCH=${GAUSSIAN_MINIBATCH:-560}  # chunks per Gaussian minibatch: the recipe's 2800 pairs / 5 steps
GAUSSIAN_ONLY=${GAUSSIAN_ONLY:-}     # 1: run only the Gaussian baseline of the given task(s) (no diffusion BC/PPO)
BC_ONLY=${BC_ONLY:-}                 # 1: only the diffusion BC starts, evaluated in mean and eta0 (no PPO)
LAYOUTS=${LAYOUTS:-protocol}         # where demos and training episodes start: this study ran before the layout split,
                                     # on the protocol's 50 init states (its evaluation's); new studies train on
                                     # sampled layouts (scripts/coverage.sh)
TASKS=("$@")
[ ${#TASKS[@]} -gt 0 ] || TASKS=(libero_object:0 libero_object:1 libero_spatial:0)
D=$ROOT/data R=$ROOT/runs
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-egl}

# The CPU recipe (the ablations on LIBERO-Object 0 are in docs/convergence.md): 16 envs grouped on the 2 cores, 140
# chunk steps per env (4 episodes each: 64 episodes, 17,920 env steps per iteration; with 16 episodes per update the
# policy drifted down), actor LR 1e-4 held constant (3e-4 collapsed at the first update), 40 gradient steps per
# iteration (minibatches of 2800 pairs), the PPO clip of ppo_diffusion.py. Its own defaults are the cluster recipe.
RECIPE=${RECIPE:-"--num-envs 16 --num-steps 140 --actor-lr 1e-4 --constant-lr --minibatch-size 2800"}
bc_recipe="--obs-mode state --denoiser mlp --batch-size 256 --lr 3e-4 --total-steps $BC_STEPS --eval-episodes 0"
step() { echo "=== [$(date +%H:%M:%S)] $*"; }

# Wall time of each PPO invocation, one line per (resumed) invocation in the run's wall_s.txt, kept up to date while
# it runs (scripts/wall_time.sh), so a run resumed over several sessions, or killed at a session's end, still adds up
# its whole wall time.
source scripts/wall_time.sh
trap timed_end EXIT

export_run() {  # export_run RUN_DIR DEST: the small artefacts of a run, for the report (none when EXPORT is "")
  local run=$1 dest=$2
  [ -n "$EXPORT" ] || return 0
  keep_earlier_run "$run" "$dest"
  mkdir -p "$dest"
  for f in args.json metrics.jsonl final_eval.json wall_s.txt; do [ -f "$run/$f" ] && cp "$run/$f" "$dest/"; done
  return 0
}

keep_earlier_run() {  # keep_earlier_run RUN_DIR DEST: DEST holding another run's export (a rerun of the recipe on a
  # new machine, e.g. for the comparison study) is a replicate, not a draft: it moves to ablations/<tag>_run<start
  # date>__<task> (tag: recipe, gaussian or the ablation's), and the branches that named it follow it
  local run=$1 dest=$2 group name tag key stamp kept b
  [ -f "$dest/metrics.jsonl" ] && [ -f "$run/metrics.jsonl" ] || return 0
  [ "$(head -1 "$dest/metrics.jsonl")" != "$(head -1 "$run/metrics.jsonl")" ] || return 0  # the same run
  group=$(basename "$(dirname "$dest")") name=$(basename "$dest")
  case $group in
    ablations) tag=${name%%__*} key=${name#*__} ;;
    tasks) tag=recipe key=$name ;;
    *) tag=$group key=$name ;;
  esac
  stamp=$($PY -c "import json, sys, time; print(time.strftime('%Y%m%d-%H%M', time.gmtime(json.loads(sys.stdin.readline())['time'])))" \
    <"$dest/metrics.jsonl")
  kept=$EXPORT/ablations/${tag}_run${stamp}__$key
  mkdir -p "$EXPORT/ablations"
  mv "$dest" "$kept"
  for b in "$EXPORT"/ablations/*/branch.json; do
    [ -f "$b" ] && sed -i "s|\"from\": \"${dest#"$EXPORT"/}\"|\"from\": \"${kept#"$EXPORT"/}\"|" "$b"
  done
  echo "the earlier run exported at $dest moved to $kept (this run replaces it there)"
}

for spec in "${TASKS[@]}"; do
  suite=${spec%%:*} id=${spec##*:}
  nn=$(printf %02d "$id")
  name=$($PY -c "import libero_env as le; print(le.resolve_task('$suite', $id).name)" 2>/dev/null | tail -1)
  step "$suite $id: $name"
  demos=$D/scripted_dart/$suite/${name}_demo.hdf5
  [ -f "$demos" ] || $PY collect.py --policy scripted --suite "$suite" --task-id "$id" --obs-mode state \
    --num-success 10 --scripted-noise 0.3 --source scripted_dart --data-root "$D" --num-envs 2 --layouts "$LAYOUTS"
  bc=$R/bc_diffusion/$suite/task${nn}__seed0/checkpoints/final.pt
  [ -n "$GAUSSIAN_ONLY" ] || [ -f "$bc" ] || $PY bc_diffusion.py --suite "$suite" --task-id "$id" --demo-source scripted_dart --num-demos 10 \
    --data-root "$D" --run-root "$R" $bc_recipe

  if [ -n "$BC_ONLY" ]; then  # the BC start's success in the evaluated mode and in eta0, on the in-run episodes
    for mode in mean eta0; do
      out=$ROOT/bc_starts/eval/bc_$mode/$suite/task$nn.json
      [ -f "$out" ] || $PY evaluate.py --policy diffusion --ckpt "$bc" --suite "$suite" --task-id "$id" \
        --num-episodes "$EVAL_EPISODES" --action-mode "$mode" --fast-step --tag "bc_$mode" \
        --results-root "$ROOT/bc_starts" | tail -1
      [ -z "$EXPORT" ] || { mkdir -p "$EXPORT/bc_starts"; cp "$out" "$EXPORT/bc_starts/${suite}_task${nn}_$mode.json"; }
    done
    step "$suite $id: BC start done"
    continue
  fi
  tag=${ABLATION:-recipe}
  runs=$ROOT/ppo/$tag
  dest=$EXPORT/tasks/${suite}_task$nn
  [ -n "$ABLATION" ] && dest=$EXPORT/ablations/${ABLATION}__${suite}_task$nn
  run=$runs/ppo_diffusion/$suite/task${nn}__seed$SEED
  if [ -z "$GAUSSIAN_ONLY" ] && [ ! -f "$run/final_eval.json" ]; then
    timed_start "$run/wall_s.txt"
    $PY ppo_diffusion.py --suite "$suite" --task-id "$id" --run-root "$runs" --bc-ckpt "$bc" --seed "$SEED" $RECIPE \
      --train-layouts "$LAYOUTS" \
      --num-iterations "$ITERS" --eval-every "$EVAL_EVERY" --eval-episodes "$EVAL_EPISODES" \
      --final-eval-episodes "$FINAL_EPISODES" $EXTRA
    timed_end
  fi
  [ -n "$GAUSSIAN_ONLY" ] || export_run "$run" "$dest"

  # The Gaussian baseline: beside the recipe's run, or alone as an ablation of its own (GAUSSIAN_ONLY with ABLATION)
  if { [ -z "$ABLATION" ] || [ -n "$GAUSSIAN_ONLY" ]; } && [[ " $GAUSSIAN " == *" $spec "* ]]; then
    grun=$runs/ppo_gaussian/$suite/task${nn}__seed0
    if [ ! -f "$grun/final_eval.json" ]; then
      timed_start "$grun/wall_s.txt"
      $PY ppo_gaussian.py --suite "$suite" --task-id "$id" --run-root "$runs" --obs-mode state --train-layouts "$LAYOUTS" \
        --demo-source scripted_dart --num-demos 10 --data-root "$D" --bc-steps "$BC_STEPS" --bc-batch-size 256 \
        --bc-lr 3e-4 $RECIPE --minibatch-size "$GAUSSIAN_MINIBATCH" --num-iterations "$ITERS" \
        --eval-every "$EVAL_EVERY" --eval-episodes "$EVAL_EPISODES" --final-eval-episodes "$FINAL_EPISODES" \
        $GAUSSIAN_EXTRA
      timed_end
    fi
    if [ -n "$ABLATION" ]; then export_run "$grun" "$dest"; else export_run "$grun" "$EXPORT/gaussian/${suite}_task$nn"; fi
  fi
  step "$suite $id: done"
done
