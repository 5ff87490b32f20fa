# Wall time of a long command in a file that survives the command being killed (sourced by scripts/convergence.sh):
#
#   source scripts/wall_time.sh; trap timed_end EXIT
#   timed_start run/wall_s.txt; python ppo_diffusion.py ...; timed_end
#
# One line per (resumed) invocation: timed_start appends it, a background ticker rewrites it every WALL_TICK seconds
# and timed_end once more at the end, so an invocation killed part-way, even by SIGKILL at the end of a session, keeps
# its seconds up to the last tick. The reports (scripts/convergence_report.py, reproduction_report.py) add the lines.
WALL_TICK=${WALL_TICK:-60}
wall_file="" wall_start=0 wall_ticker=""

wall_write() {  # rewrite the last line of $wall_file with the seconds since $wall_start (temp file + rename: atomic)
  { head -n -1 "$wall_file"; echo "$(($(date +%s) - wall_start))"; } >"$wall_file.tmp" && mv "$wall_file.tmp" "$wall_file"
}

timed_start() {  # timed_start FILE
  wall_file=$1 wall_start=$(date +%s)
  mkdir -p "$(dirname "$wall_file")" && echo 0 >>"$wall_file"
  # the ticker stops with this shell ($$ is this shell's pid in the subshell too) and writes nothing to its output, so
  # that no sleep of it holds a caller's pipe open after the end
  (while sleep "$WALL_TICK" && kill -0 $$; do wall_write; done) >/dev/null 2>&1 &
  wall_ticker=$!
}

timed_end() {  # the invocation's last time; a no-op when none is being timed
  [ -n "$wall_file" ] || return 0
  pkill -P "$wall_ticker" sleep 2>/dev/null || true  # the ticker's sleep, then the ticker
  kill "$wall_ticker" 2>/dev/null || true
  wait "$wall_ticker" 2>/dev/null || true
  wall_write
  wall_file=""
}
