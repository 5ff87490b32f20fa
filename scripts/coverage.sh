#!/usr/bin/env bash
# The coverage study (docs/coverage.md): the data generator on a pre-registered sample of ten tasks from all five suites
# (scripts/coverage_draw.py -> docs/coverage/draw.json), trained on sampled layouts, evaluated on the held-out protocol.
#
#   bash scripts/coverage.sh                        # every drawn task, in the draw's order (each skips what is done)
#   bash scripts/coverage.sh libero_spatial:3       # one task (suite:local id); it must be one of the draw
#
# Per task, the recipe a user gets (one for all tasks, no per-task tuning):
#  1. 50 DART demonstrations (the scripted expert, its arm actions perturbed by noise 0.1, labelled with its own
#     actions; an object placed on another is set down held, collect.py --scripted-placement set-down) on layouts
#     LIBERO's placement initializer samples (collect.py --layouts sampled): as many demos as LIBERO ships human
#     demos per task, none from the protocol's 50 init states. This is the second recipe: the first (committed with
#     the draw, before any run) had noise 0.3 and released the object 1 cm above its target; its three runs all
#     missed, and the measured reasons pointed at the BC data (docs/coverage.md, "Lifting the misses"). Its rows are
#     docs/coverage/recipe-v1/ (PLACEMENT=release NOISE=0.3 EXPORT=docs/coverage/recipe-v1 with a COV_ROOT of its
#     own reproduces them);
#  2. the BC start: bc_diffusion.py, state observations, the MLP denoiser, 8000 steps of batch 256 (convergence.sh's);
#  3. ppo_diffusion.py with the CPU recipe (16 envs x 140 chunk steps, actor LR 1e-4 held, minibatches of 2800
#     pairs) on sampled layouts for <= 1.5M env steps: 83 iterations of 17,920 env steps (1,487,360). LIBERO-10's
#     520-step limit is 65 chunks: 140 chunk steps would hold only two whole episodes per env (32 per iteration,
#     where 16 per iteration drifted down and 64 learned, docs/convergence.md), so that suite runs 260 chunk steps
#     (four episodes at its limit per env, as 140 is at LIBERO-Object's 280) for 45 iterations (1,497,600 env steps)
#     with the same minibatch, i.e. as many gradient steps per env step; in-run evaluations every 10 iterations (50
#     protocol episodes, mean and eta0), at the end every action mode over the same 200 protocol episodes;
#  4. the final policy in the evaluated mode on 200 sampled layouts (seeds no training or demo episode used): the
#     training distribution beside the held-out protocol;
#  5. the BC start over the final evaluation's 200 protocol episodes in its mode (what PPO added, episode by episode);
#  6. below 95 % on the protocol: scripts/failure_modes.py over the failed protocol episodes (where they fail).
# Knobs for a lift study (item 5 of the issue; EXPORT/COV_ROOT elsewhere): PLACEMENT (release or set-down: how the
# expert's demos end a placement on another object, collect.py --scripted-placement), DEMOS, NOISE (the DART noise),
# BC_ONLY=1 (stop at the BC start, evaluated over EVAL_EPISODES protocol episodes in mean and eta0, as a PPO run's
# iteration-0 evaluation).
# Every step skips work whose output exists; the phase scripts resume their own checkpoints and .partial files. The
# small artefacts go to $EXPORT/tasks/<suite>_task<NN>/ (committed); scripts/coverage_report.py writes docs/coverage.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${COV_ROOT:-coverage_study}      # checkpoints and HDF5 (not committed; not "coverage": a folder of that name in
                                      # the working directory shadows the coverage package numba imports)
EXPORT=${EXPORT:-docs/coverage}       # the committed artefacts
DRAW=${DRAW:-docs/coverage/draw.json} # the pre-registered sample (a lift study exports elsewhere, same draw)
PLACEMENT=${PLACEMENT:-set-down}      # how the expert's demos end a placement on another object (collect.py --scripted-placement)
BC_ONLY=${BC_ONLY:-0}                 # 1: stop after the BC start, evaluated on EVAL_EPISODES protocol episodes
DEMOS=${DEMOS:-50}
NOISE=${NOISE:-0.1}                   # DART: std of the noise on the expert's executed arm actions
BC_STEPS=${BC_STEPS:-8000}
EVAL_EVERY=${EVAL_EVERY:-10}
EVAL_EPISODES=${EVAL_EPISODES:-50}
FINAL_EPISODES=${FINAL_EPISODES:-200}
SAMPLED_EPISODES=${SAMPLED_EPISODES:-200}
SAMPLED_SEED=${SAMPLED_SEED:-3000000}  # env seeds 3,000,000 + e: no demo (0 + e) or PPO (10^6 + n) episode's
MAX_DEMO_EPISODES=${MAX_DEMO_EPISODES:-$((DEMOS * 4))}
GATE=${GATE:-0.95}                    # below it on the protocol, the failures are analysed
RECIPE=${RECIPE:-"--num-envs 16 --actor-lr 1e-4 --constant-lr --minibatch-size 2800"}
TASKS=("$@")
if [ ${#TASKS[@]} -eq 0 ]; then
  mapfile -t TASKS < <($PY -c "import json; print('\n'.join(json.load(open('$DRAW'))['order']))")
fi
for spec in "${TASKS[@]}"; do  # bad input stops the study before any work
  $PY -c "import json, sys; sys.exit(0 if '$spec' in json.load(open('$DRAW'))['order'] else 1)" || {
    echo "error: $spec is not one of the drawn tasks in $DRAW; the sample is pre-registered." >&2; exit 2; }
done
budget() {  # budget SUITE: "<chunk steps per env> <iterations>" (see 3. above; NUM_STEPS / ITERS override: smoke runs)
  if [ "$1" = libero_10 ]; then echo "${NUM_STEPS:-260} ${ITERS:-45}"; else echo "${NUM_STEPS:-140} ${ITERS:-83}"; fi
}
D=$ROOT/data R=$ROOT/runs
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-egl}
step() { echo "=== [$(date +%H:%M:%S)] $*"; }
source scripts/wall_time.sh
trap timed_end EXIT

for spec in "${TASKS[@]}"; do
  suite=${spec%%:*} id=${spec##*:}
  nn=$(printf %02d "$id")
  read -r num_steps iters <<<"$(budget "$suite")"
  name=$($PY -c "import libero_env as le; print(le.resolve_task('$suite', $id).name)" 2>/dev/null | tail -1)
  out=$EXPORT/tasks/${suite}_task$nn
  mkdir -p "$out"
  step "$suite $id: $name"

  demos=$D/scripted_dart/$suite/${name}_demo.hdf5
  if [ ! -f "$demos" ]; then
    timed_start "$out/demos_wall_s.txt"
    $PY collect.py --policy scripted --suite "$suite" --task-id "$id" --obs-mode state --num-success "$DEMOS" \
      --scripted-noise "$NOISE" --source scripted_dart --data-root "$D" --num-envs 2 --layouts sampled \
      --max-episodes "$MAX_DEMO_EPISODES" --scripted-placement "$PLACEMENT"
    timed_end
  fi
  # demos.json is rewritten every time: it describes the file this run uses
  $PY -c "
import json, h5py
with h5py.File('$demos') as f:
    a = dict(f['data'].attrs)
    demos = [f['data'][k] for k in f['data'] if k.startswith('demo_')]
    print(json.dumps({'layouts': str(a['layouts']), 'scripted_placement': str(a.get('scripted_placement', 'release')),
                      'scripted_noise': float(a['scripted_noise']), 'num_demos': len(demos), 'num_attempts': int(a['num_attempts']),
                      'success_rate': float(a['success_rate']), 'mean_length': sum(len(d['actions']) for d in demos) / len(demos),
                      'init_states': sorted({int(d.attrs['init_state_index']) for d in demos})}))" >"$out/demos.json"

  bc=$R/bc_diffusion/$suite/task${nn}__seed0/checkpoints/final.pt
  [ -f "$bc" ] || $PY bc_diffusion.py --suite "$suite" --task-id "$id" --demo-source scripted_dart --num-demos "$DEMOS" \
    --data-root "$D" --run-root "$R" --obs-mode state --denoiser mlp --batch-size 256 --lr 3e-4 \
    --total-steps "$BC_STEPS" --eval-episodes 0
  if [ "$BC_ONLY" = 1 ]; then  # the BC start alone, as the PPO run's iteration-0 evaluation measures it
    for mode in mean eta0; do
      res=$ROOT/results/eval/bc_start_$mode/$suite/task$nn.json
      [ -f "$res" ] || $PY evaluate.py --policy diffusion --ckpt "$bc" --suite "$suite" --task-id "$id" \
        --num-episodes "$EVAL_EPISODES" --action-mode $mode --fast-step --tag bc_start_$mode \
        --results-root "$ROOT/results" --num-envs 2 | tail -1
      cp "$res" "$out/bc_start_$mode.json"
    done
    step "$suite $id: BC start done"
    continue
  fi

  run=$R/ppo_diffusion/$suite/task${nn}__seed0
  if [ ! -f "$run/final_eval.json" ]; then
    timed_start "$out/wall_s.txt"
    $PY ppo_diffusion.py --suite "$suite" --task-id "$id" --run-root "$R" --bc-ckpt "$bc" $RECIPE \
      --num-steps "$num_steps" --num-iterations "$iters" --train-layouts sampled --eval-every "$EVAL_EVERY" \
      --eval-episodes "$EVAL_EPISODES" --final-eval-episodes "$FINAL_EPISODES"
    timed_end
  fi
  for f in args.json metrics.jsonl final_eval.json; do cp "$run/$f" "$out/"; done

  sampled=$ROOT/results/eval/sampled/$suite/task$nn.json
  [ -f "$sampled" ] || $PY evaluate.py --policy diffusion --ckpt "$run/checkpoints/final.pt" --suite "$suite" \
    --task-id "$id" --layouts sampled --num-episodes "$SAMPLED_EPISODES" --seed "$SAMPLED_SEED" --fast-step \
    --tag sampled --results-root "$ROOT/results" --num-envs 2 | tail -1
  cp "$sampled" "$out/sampled_eval.json"

  # the BC start on the final evaluation's own episodes and mode: what PPO added (or took away) episode by episode
  mode=$($PY -c "import json; print(json.load(open('$out/final_eval.json'))['eval_mode'])")
  bc_final=$ROOT/results/eval/bc_start_final/$suite/task$nn.json
  [ -f "$bc_final" ] || $PY evaluate.py --policy diffusion --ckpt "$bc" --suite "$suite" --task-id "$id" \
    --num-episodes "$FINAL_EPISODES" --action-mode "$mode" --fast-step --tag bc_start_final \
    --results-root "$ROOT/results" --num-envs 2 | tail -1
  cp "$bc_final" "$out/bc_start_final.json"

  if [ ! -f "$out/failures.json" ] && $PY -c "
import json, sys; r = json.load(open('$out/final_eval.json')); sys.exit(0 if r[r['eval_mode']]['success_rate'] < $GATE else 1)"; then
    failed=$($PY -c "
import json; r = json.load(open('$out/final_eval.json'))
print(' '.join(str(e) for e, s in enumerate(r[r['eval_mode']]['successes']) if not s))")
    $PY scripts/failure_modes.py --ckpt "$run/checkpoints/final.pt" --suite "$suite" --task-id "$id" \
      --episodes $failed --out "$out/failures.json" >/dev/null
  fi
  step "$suite $id: done"
done
