#!/usr/bin/env bash
# Stop the head started by infra/ray-head-start.sh, and only that one: it signals the recorded
# `ray start --block` process, which takes down its own GCS, raylet, dashboard, drivers and workers.
# (`ray stop` would also kill every other Ray cluster this user runs on the machine.)
#
#   infra/ray-head-stop.sh [--state-dir DIR] [--timeout SECONDS]
set -euo pipefail

state_dir="${XDG_STATE_HOME:-$HOME/.local/state}/orchestrator/ray-head"
timeout=60
while [[ $# -gt 0 ]]; do
  case "$1" in
    --state-dir) state_dir="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
    *) echo "ray-head-stop: unknown option $1" >&2; exit 2 ;;
  esac
done

pid_file="$state_dir/head.pid"
if [[ ! -f "$pid_file" ]]; then
  echo "ray-head-stop: no head recorded in $state_dir (nothing to stop)" >&2
  exit 0
fi
pid="$(cat "$pid_file")"

# Only signal the pid if it is still our `ray start` (a stale file may name a reused pid).
if ! kill -0 "$pid" 2>/dev/null || ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "ray start --head"; then
  echo "ray-head-stop: head (pid $pid) is not running; cleaning up $state_dir" >&2
  rm -f "$pid_file" "$state_dir/env.sh"
  exit 0
fi

# The setsid in the start script made the head a session leader: its session id lists every
# process it started, so stragglers can be found without matching names.
sid="$(ps -o sid= -p "$pid" | tr -d ' ')"
kill -TERM "$pid"
for ((i = 0; i < timeout; i++)); do
  kill -0 "$pid" 2>/dev/null || break
  sleep 1
done
if kill -0 "$pid" 2>/dev/null; then
  echo "ray-head-stop: head did not exit in ${timeout}s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
fi
if [[ "$sid" == "$pid" ]]; then
  for ((i = 0; i < 10; i++)); do
    left="$(ps -e -o pid=,sid= | awk -v s="$sid" '$2 == s {print $1}')"
    [[ -z "$left" ]] && break
    sleep 1
  done
  if [[ -n "$left" ]]; then
    echo "ray-head-stop: killing leftover processes of the head: $(echo $left)" >&2
    kill -KILL $left 2>/dev/null || true
  fi
fi
rm -f "$pid_file" "$state_dir/env.sh"
echo "ray-head-stop: stopped the Ray head (pid $pid)" >&2
