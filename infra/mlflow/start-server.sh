#!/usr/bin/env bash
# MLflow tracking server: runs in a database, artifacts in a store the server proxies
# (clients need no storage credentials, only MLFLOW_TRACKING_URI=http://HOST:PORT).
#
#   infra/mlflow/start-server.sh                    # one machine: the project's SQLite store in $ORCHESTRATOR_HOME/mlruns
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow \
#     infra/mlflow/start-server.sh                  # team server: PostgreSQL + S3 (or gs://, a path, ...)
#
# Options: --host ADDR (127.0.0.1)  --port N (5000)  --workers N (2)  --print-command (show, do not run)
# Anything after `--` goes to `mlflow server` unchanged (e.g. --app-name basic-auth).
# The database password never goes in the URI (it would show in `ps`): set PGPASSWORD or use ~/.pgpass,
# both read by libpq. Binding anything but 127.0.0.1 needs --allowed-hosts for the names clients use.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
home="${ORCHESTRATOR_HOME:-$repo}"

host=127.0.0.1 port=5000 workers=2 print_only=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --print-command) print_only=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
    *) echo "start-server: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The SQLite fallback serves the store the project writes without a server (mlruns/mlflow.db,
# artifacts beside it), so runs from before and after the server are in one place.
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlruns/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$home/mlruns/artifacts}"

if [[ "$backend" =~ ^postgres(ql)?(\+psycopg2)?://[^/@]*:[^/@]*@ ]]; then
  echo "start-server: put the database password in PGPASSWORD or ~/.pgpass, not in MLFLOW_BACKEND_STORE_URI" >&2
  exit 2
fi

venv="${VIRTUAL_ENV:-$repo/.venv}"
if [[ -x "$venv/bin/mlflow" ]]; then export PATH="$venv/bin:$PATH"; fi

cmd=(mlflow server
  --backend-store-uri "$backend"
  --artifacts-destination "$artifacts" --serve-artifacts
  --host "$host" --port "$port" --workers "$workers")
if [[ ${#extra[@]} -gt 0 ]]; then cmd+=("${extra[@]}"); fi

if [[ "$print_only" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

# Fail before starting with the pip line that fixes a missing driver.
need() { python -c "import $1" 2>/dev/null || { echo "start-server: $2 needs the '$3' package: pip install $3" >&2; exit 1; }; }
case "$backend" in postgres*) need psycopg2 "$backend" psycopg2-binary ;; mysql*) need pymysql "$backend" pymysql ;; esac
case "$artifacts" in s3://*) need boto3 "$artifacts" boto3 ;; gs://*) need google.cloud.storage "$artifacts" google-cloud-storage ;; esac

if [[ "$backend" == sqlite:///* ]]; then mkdir -p "$(dirname "${backend#sqlite:///}")"; fi
if [[ "$artifacts" != *://* ]]; then mkdir -p "$artifacts"; fi

echo "MLflow server on http://$host:$port  (runs: $backend, artifacts: $artifacts)" >&2
echo "Clients: export MLFLOW_TRACKING_URI=http://$host:$port" >&2
exec "${cmd[@]}"
