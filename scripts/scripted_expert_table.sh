#!/usr/bin/env bash
# Success rate of the scripted expert over the 50 fixed init states of every LIBERO-Object and LIBERO-Spatial
# task (no rendering: --obs-mode state, nothing saved). Prints a markdown table; takes ~45 min on 2 cores.
#   bash scripts/scripted_expert_table.sh > docs/scripted_expert_table.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
echo "| suite | task | instruction | success (50 init states) |"
echo "|---|---|---|---|"
for suite in libero_object libero_spatial; do
  for t in 0 1 2 3 4 5 6 7 8 9; do
    out=$($PY collect.py --policy scripted --suite $suite --task-id $t --num-success 50 --max-episodes 50 \
          --obs-mode state --no-save --num-envs 2 2>/dev/null)
    instruction=$(echo "$out" | sed -n "s/^task: .*'\(.*\)'$/\1/p")
    rate=$(echo "$out" | sed -n 's/^success rate \([0-9.]*\) (\([0-9]*\)\/\([0-9]*\) episodes).*/\2\/\3/p')
    echo "| $suite | $t | $instruction | $rate |"
  done
done
