#!/usr/bin/env bash
# Success rate of the scripted expert over the 50 fixed init states of every LIBERO task (state mode, nothing
# saved), and docs/scripted_expert_table.md. Resumable (one result file per task in docs/scripted_expert/);
# all 130 tasks take several hours on 2 cores. Arguments go to scripts/scripted_expert_table.py, e.g.
#   bash scripts/scripted_expert_table.sh --tasks libero_goal:7 libero_10:0
#   bash scripts/scripted_expert_table.sh --rerun-stale      # re-measure rows of an earlier expert version
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PY:-.venv/bin/python}" scripts/scripted_expert_table.py "$@"
