#!/usr/bin/env bash
# The checks that need a CUDA device, as one short run on a GPU node (record what it prints in RESULTS.md):
#   1. the tests of the training scripts with CUDA present (the `gpu` tests run; the CLI tests pick the GPU up),
#   2. the rollout sampler's latency: eager vs CUDA-graphed vs diffusers' loop (benchmarks/sampler.py),
#   3. BC / PPO-update throughput and act() latency (benchmarks/bc_throughput.py).
# No simulator is needed (the `sim` and `slurm` tests are left out). Each step has its own time limit, and a step
# that fails does not stop the next.
#
#   bash benchmarks/gpu_checks.sh [out_dir]        # out_dir (default /tmp/gpu_checks) gets one log per step
#   PYTEST_ARGS="--deselect tests/..." bash benchmarks/gpu_checks.sh     # extra pytest arguments
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu_checks}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
cd "$(dirname "$0")/.."

step() {  # step <name> <seconds> <command...>: run with a limit, log to OUT_DIR/<name>.txt, report its exit status
    local name=$1 limit=$2
    shift 2
    echo "=== [$(date -u +%H:%M:%S)] $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
step tests 200 $PY -m pytest -q -p no:cacheprovider -m "not sim and not slurm" --timeout 150 -n 8 \
    tests/test_ppo_diffusion.py tests/test_ppo_core.py tests/test_ppo_gaussian.py tests/test_bc_diffusion.py \
    tests/test_finetune_vla.py tests/test_finetune_vla_distributed.py ${PYTEST_ARGS:-}
step sampler_rgb 100 $PY benchmarks/sampler.py
step sampler_state 60 $PY benchmarks/sampler.py --obs-mode state
step sampler_eta0 60 $PY benchmarks/sampler.py --deterministic --batch-sizes 1 64
step bc_throughput 90 $PY benchmarks/bc_throughput.py
