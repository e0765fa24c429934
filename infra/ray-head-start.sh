#!/usr/bin/env bash
# Start a local Ray head for `ray job submit`: token auth on, dashboard and Jobs API on 127.0.0.1.
#
#   eval "$(infra/ray-head-start.sh)"      # starts the head and exports what `ray job submit` needs
#   ray job submit --working-dir . -- python jobs/sweep.py ablations/quick.yaml
#   infra/ray-head-stop.sh
#
# stdout carries only `export` lines (so `eval` works); everything else goes to stderr. The same
# lines are written to STATE_DIR/env.sh for other shells: `. ~/.local/state/orchestrator/ray-head/env.sh`.
#
# Options (all optional):
#   --port N              GCS port (6379)            --dashboard-port N   dashboard + Jobs API (8265)
#   --client-port N       Ray Client server (10001)  --agent-port N       dashboard agent HTTP (52365)
#   --worker-ports A-B    worker port range (10002-19999)
#   --num-cpus N          CPUs to offer (all)        --num-gpus N         GPUs to offer (auto-detected)
#   --object-store-mb N   object store size (Ray's default: 30% of RAM)
#   --state-dir DIR       pid, log, env.sh (${XDG_STATE_HOME:-~/.local/state}/orchestrator/ray-head)
#   --temp-dir DIR        Ray's session/log root (Ray's default, /tmp/ray)
# Environment:
#   ORCHESTRATOR_HOME     where jobs write data/, results/, mlruns/ (default: this checkout)
#   MLFLOW_TRACKING_URI   passed on to every job when set (default: SQLite under $ORCHESTRATOR_HOME/mlruns)
#   RAY_AUTH_TOKEN_PATH   token file (default ~/.ray/auth_token, Ray's own default); created if missing
#   RAY_AUTH_TOKEN        a token given directly (then no file is read or written)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

port=6379 dashboard_port=8265 client_port=10001 agent_port=52365 worker_ports=10002-19999
num_cpus="" num_gpus="" object_store_mb="" temp_dir=""
default_state_dir="${XDG_STATE_HOME:-$HOME/.local/state}/orchestrator/ray-head"
state_dir="$default_state_dir"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --dashboard-port) dashboard_port="$2"; shift 2 ;;
    --client-port) client_port="$2"; shift 2 ;;
    --agent-port) agent_port="$2"; shift 2 ;;
    --worker-ports) worker_ports="$2"; shift 2 ;;
    --num-cpus) num_cpus="$2"; shift 2 ;;
    --num-gpus) num_gpus="$2"; shift 2 ;;
    --object-store-mb) object_store_mb="$2"; shift 2 ;;
    --state-dir) state_dir="$2"; shift 2 ;;
    --temp-dir) temp_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
    *) echo "ray-head-start: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The job's `python` is whatever PATH the head hands its drivers: put the project's venv first.
venv="${VIRTUAL_ENV:-$repo/.venv}"
if [[ -x "$venv/bin/ray" ]]; then
  export PATH="$venv/bin:$PATH"
elif ! command -v ray >/dev/null; then
  echo "ray-head-start: no ray in $venv/bin or on PATH; run 'make setup' first" >&2; exit 1
fi
python_bin="$(command -v python)"

mkdir -p "$state_dir"
chmod 700 "$state_dir"
pid_file="$state_dir/head.pid" log_file="$state_dir/head.log" env_file="$state_dir/env.sh"
if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "ray-head-start: a head from $state_dir is already running (pid $(cat "$pid_file")); stop it with infra/ray-head-stop.sh" >&2
  exit 1
fi

# A busy port usually means another head: fail now, before the readiness check below could
# mistake that head's Jobs API for ours.
for p in "$port" "$dashboard_port" "$client_port" "$agent_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "ray-head-start: port $p on 127.0.0.1 is in use (another Ray head?); choose others with --port, --dashboard-port, --client-port, --agent-port" >&2
    exit 1
  fi
done

# Token auth, always. Ray reads the token from RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else
# ~/.ray/auth_token; `ray start` refuses RAY_AUTH_MODE=token without one, so make one if missing.
export RAY_AUTH_MODE=token
token_path=""
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  token_path="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [[ ! -s "$token_path" ]]; then
    mkdir -p "$(dirname "$token_path")"
    (umask 077 && "$python_bin" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$token_path")
    echo "ray-head-start: created a new auth token in $token_path" >&2
  fi
  chmod 600 "$token_path"
  # Only exported when not Ray's default path, so the env file stays minimal.
  if [[ "$token_path" != "$HOME/.ray/auth_token" ]]; then export RAY_AUTH_TOKEN_PATH="$token_path"; fi
fi

# Environment set here is inherited by the raylet and so by every job driver and worker (verified:
# see infra/README.md). A driver runs in a temporary copy of --working-dir, so relative paths
# (data/, results/, mlruns/) are taken against ORCHESTRATOR_HOME to land in the checkout.
export ORCHESTRATOR_HOME="${ORCHESTRATOR_HOME:-$repo}"
mkdir -p "$ORCHESTRATOR_HOME"  # jobs write their data, results and MLflow store here
export RAY_DISABLE_USAGE_STATS=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
# Ray-internal state clients (Train's placement-group cleaner) otherwise guess the head by scanning
# for GCS processes and fail when another Ray cluster runs on the same machine.
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$dashboard_port"
# A single-node head serves no traffic to drain on SIGTERM; Ray's default waits 30 s.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"

args=(start --head --block --disable-usage-stats
  --port "$port" --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --include-dashboard true
  --ray-client-server-port "$client_port" --dashboard-agent-listen-port "$agent_port"
  --min-worker-port "${worker_ports%-*}" --max-worker-port "${worker_ports#*-}")
if [[ -n "$num_cpus" ]]; then args+=(--num-cpus "$num_cpus"); fi
if [[ -n "$num_gpus" ]]; then args+=(--num-gpus "$num_gpus"); fi
if [[ -n "$object_store_mb" ]]; then args+=(--object-store-memory "$((object_store_mb * 1024 * 1024))"); fi
if [[ -n "$temp_dir" ]]; then args+=(--temp-dir "$temp_dir"); fi

# --block keeps `ray start` as the parent of the head's processes: killing it (ray-head-stop.sh)
# stops exactly this head, where `ray stop` would kill every Ray process of this user.
# setsid detaches it from this terminal; stdout must not stay open or `eval "$(...)"` would hang.
launcher=()
if command -v setsid >/dev/null; then launcher=(setsid); fi
${launcher[@]+"${launcher[@]}"} nohup ray "${args[@]}" </dev/null >"$log_file" 2>&1 &
head_pid=$!
echo "$head_pid" > "$pid_file"

# Ready when the Jobs API answers with the token; refuse to report success if it also answers
# without one (auth must be on).
if ! "$python_bin" - "$dashboard_port" "$head_pid" <<'PY' >&2
import os, sys, time, urllib.error, urllib.request

port, pid = int(sys.argv[1]), int(sys.argv[2])
base = f"http://127.0.0.1:{port}"
token = os.environ.get("RAY_AUTH_TOKEN") or open(
    os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")).read().strip()

def status(path, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers or {}), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

deadline = time.time() + 120
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("ray-head-start: `ray start` exited early")
    try:
        if status("/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("ray-head-start: the Jobs API did not come up within 120 s")
    time.sleep(1)
if status("/api/jobs/") != 401:
    sys.exit("ray-head-start: the Jobs API answered without a token; refusing to run an open head")
PY
then
  echo "--- last lines of $log_file:" >&2
  tail -n 30 "$log_file" >&2
  kill -TERM "$head_pid" 2>/dev/null || true
  rm -f "$pid_file"
  exit 1
fi

{
  echo "export RAY_ADDRESS=127.0.0.1:$port"                           # ray.init / orchestrator train join this head
  echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port" # ray job submit/status/logs
  echo "export RAY_AUTH_MODE=token"                                    # without it the CLI sends no token
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
} > "$env_file"
chmod 600 "$env_file"

stop_args=""
if [[ "$state_dir" != "$default_state_dir" ]]; then stop_args=" --state-dir $state_dir"; fi
cat >&2 <<EOF
Ray head running (pid $head_pid): dashboard and Jobs API on http://127.0.0.1:$dashboard_port, token auth on.
  jobs write to:  $ORCHESTRATOR_HOME  (data/, results/, mlruns/)
  MLflow:         ${MLFLOW_TRACKING_URI:-sqlite store under \$ORCHESTRATOR_HOME/mlruns}
  job python:     $python_bin
  token:          ${token_path:-\$RAY_AUTH_TOKEN}   (browser: paste it into the dashboard's login prompt)
  log:            $log_file
  env for other shells: . $env_file
Submit:  ray job submit --working-dir . -- python jobs/sweep.py ablations/quick.yaml
Stop:    infra/ray-head-stop.sh$stop_args
EOF
cat "$env_file"
