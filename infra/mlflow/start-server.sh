#!/usr/bin/env bash
# MLflow tracking server: runs in a database, artifacts in a store the server proxies
# (--serve-artifacts: clients need no storage credentials, only MLFLOW_TRACKING_URI=http://HOST:PORT,
# and every experiment it creates gets an mlflow-artifacts: root that all nodes of a cluster reach).
#
#   infra/mlflow/start-server.sh                    # one machine: the project's SQLite store in $ORCHESTRATOR_HOME/mlruns
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow \
#     infra/mlflow/start-server.sh --host 10.0.0.10 # team server: PostgreSQL + S3 (or gs://, a path, ...)
#
# Options: --host ADDR (127.0.0.1)  --port N (5000)  --workers N (2)  --print-command (show, do not run)
#   --allowed-hosts LIST  Host headers the server answers (MLflow's DNS-rebinding guard answers 403 to any
#                         other): default $MLFLOW_SERVER_ALLOWED_HOSTS, else --host's address with the port
#                         (loopback: localhost and 127.0.0.1). Add the names clients use, e.g.
#                         mlflow.mlflow.svc:5000. Browser origins allowed to change things (CORS) follow:
#                         http:// + each entry, unless $MLFLOW_SERVER_CORS_ALLOWED_ORIGINS says otherwise.
#   --basic-auth          Log-in with users and permissions (MLflow's basic-auth app; same as
#                         `-- --app-name basic-auth`). Needs `pip install 'Flask-WTF<2'` (mlflow[auth]).
# Anything after `--` goes to `mlflow server` unchanged.
#
# Basic auth is configured from the environment only; the script writes MLflow's auth config to a private
# temporary file (mode 600, removed when the server stops) and points MLFLOW_AUTH_CONFIG_PATH at it:
#   MLFLOW_AUTH_ADMIN_PASSWORD   the admin's password, read by MLflow itself (at least 12 characters; needed
#                                on the first start, which creates the admin user; ignored once it exists)
#   MLFLOW_AUTH_ADMIN_USERNAME   the admin's name (admin)
#   MLFLOW_AUTH_DATABASE_URI     the users database (required with a server database; with SQLite the
#                                default is basic_auth.db beside the runs' store)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what every user may do on others' experiments (READ)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the log-in forms (a random one per start when unset)
#   MLFLOW_AUTH_CONFIG_PATH      your own auth config file: used as it is, nothing generated
# Database passwords never go in a URI (it would show in `ps`): set PGPASSWORD or use ~/.pgpass, both
# read by libpq, for the runs' database and the users' database alike.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
home="${ORCHESTRATOR_HOME:-$repo}"

host=127.0.0.1 port=5000 workers=2 print_only=0 basic_auth=0 allowed_hosts="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --allowed-hosts) allowed_hosts="$2"; shift 2 ;;
    --basic-auth) basic_auth=1; shift ;;
    --print-command) print_only=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,33p' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
    *) echo "start-server: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

fail() { echo "start-server: $*" >&2; exit 2; }

# `-- --app-name basic-auth` (MLflow's own spelling) turns on the same configuration as --basic-auth.
passed=()
for ((i = 0; i < ${#extra[@]}; i++)); do
  case "${extra[i]}" in
    --app-name=basic-auth) basic_auth=1 ;;
    --app-name)
      if [[ "${extra[i + 1]:-}" == basic-auth ]]; then basic_auth=1; i=$((i + 1)); else passed+=("${extra[i]}"); fi ;;
    --allowed-hosts|--allowed-hosts=*) fail "give --allowed-hosts before --, so that CORS origins follow it" ;;
    *) passed+=("${extra[i]}") ;;
  esac
done

# The SQLite fallback serves the store the project writes without a server (mlruns/mlflow.db,
# artifacts beside it), so runs from before and after the server are in one place.
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlruns/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$home/mlruns/artifacts}"

password_in_uri='^[a-z0-9+]+://[^/@]*:[^/@]*@'
if [[ "$backend" =~ $password_in_uri ]]; then
  fail "put the database password in PGPASSWORD or ~/.pgpass, not in MLFLOW_BACKEND_STORE_URI"
fi

# Host headers: the address the server is bound to, as clients write it (with the port; without it for :80).
default_allowed_hosts() {
  case "$host" in
    127.0.0.1|localhost|::1) echo "localhost:$port,127.0.0.1:$port,[::1]:$port,localhost,127.0.0.1" ;;
    *:*) echo "[$host]:$port,[$host]" ;;  # an IPv6 address
    *) echo "$host:$port,$host" ;;
  esac
}
allowed_hosts="${allowed_hosts:-${MLFLOW_SERVER_ALLOWED_HOSTS:-$(default_allowed_hosts)}}"
if [[ -z "${MLFLOW_SERVER_CORS_ALLOWED_ORIGINS:-}" ]]; then
  cors_origins="http://${allowed_hosts//,/,http://}"
else
  cors_origins="$MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"
fi

venv="${VIRTUAL_ENV:-$repo/.venv}"
if [[ -x "$venv/bin/mlflow" ]]; then export PATH="$venv/bin:$PATH"; fi

cmd=(mlflow server
  --backend-store-uri "$backend"
  --artifacts-destination "$artifacts" --serve-artifacts
  --host "$host" --port "$port" --workers "$workers"
  --allowed-hosts "$allowed_hosts" --cors-allowed-origins "$cors_origins")
if [[ "$basic_auth" == 1 ]]; then cmd+=(--app-name basic-auth); fi
if [[ ${#passed[@]} -gt 0 ]]; then cmd+=("${passed[@]}"); fi

# ---------------------------------------------------------------------------------------------- basic auth
auth_dir=""
write_auth_config() {
  local database="${MLFLOW_AUTH_DATABASE_URI:-}"
  if [[ -z "$database" ]]; then
    [[ "$backend" == sqlite:///* ]] || fail "basic auth with a database server needs MLFLOW_AUTH_DATABASE_URI" \
      "(the users' database, e.g. postgresql://mlflow@db.internal:5432/mlflow_auth)"
    database="sqlite:///$(dirname "${backend#sqlite:///}")/basic_auth.db"
  fi
  if [[ "$database" =~ $password_in_uri ]]; then
    fail "put the database password in PGPASSWORD or ~/.pgpass, not in MLFLOW_AUTH_DATABASE_URI"
  fi
  local username="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" permission="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
  [[ "$username$database$permission" != *$'\n'* ]] || fail "a basic-auth setting holds a line break"
  auth_dir="$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")"
  (umask 077 && cat > "$auth_dir/basic_auth.ini") <<EOF
[mlflow]
default_permission = $permission
database_uri = $database
admin_username = $username
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
  export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
}

if [[ "$basic_auth" == 1 && -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then write_auth_config; fi

if [[ "$print_only" == 1 ]]; then
  # The generated auth config stays for the printed command to use.
  if [[ "$basic_auth" == 1 ]]; then printf 'MLFLOW_AUTH_CONFIG_PATH=%q ' "$MLFLOW_AUTH_CONFIG_PATH"; fi
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

# Fail before starting with the pip line that fixes a missing driver.
need() { python -c "import $1" 2>/dev/null || { echo "start-server: $2 needs the '$3' package: pip install '$3'" >&2; exit 1; }; }
case "$backend" in postgres*) need psycopg2 "$backend" psycopg2-binary ;; mysql*) need pymysql "$backend" pymysql ;; esac
case "$artifacts" in s3://*) need boto3 "$artifacts" boto3 ;; gs://*) need google.cloud.storage "$artifacts" google-cloud-storage ;; esac
if [[ "$basic_auth" == 1 ]]; then
  need flask_wtf "--basic-auth" "Flask-WTF<2"
  if [[ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
    echo "start-server: MLFLOW_AUTH_ADMIN_PASSWORD is not set: fine once the admin user exists;" \
      "the first start needs it" >&2
  fi
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_hex(32))')"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
fi

if [[ "$backend" == sqlite:///* ]]; then mkdir -p "$(dirname "${backend#sqlite:///}")"; fi
if [[ "$artifacts" != *://* ]]; then mkdir -p "$artifacts"; fi

echo "MLflow server on http://$host:$port  (runs: $backend, artifacts: $artifacts, Host headers: $allowed_hosts)" >&2
echo "Clients: export MLFLOW_TRACKING_URI=http://$host:$port" >&2
if [[ -z "$auth_dir" ]]; then exec "${cmd[@]}"; fi

# With a generated auth config the server runs as a child, so that the file goes when the server does.
trap 'rm -rf "$auth_dir"' EXIT
"${cmd[@]}" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' INT TERM
while true; do
  wait "$server" && status=0 || status=$?
  kill -0 "$server" 2>/dev/null || break  # a signal only interrupted the wait: keep waiting for the exit
done
exit "$status"
