-- One-time database setup for the MLflow server (run as a PostgreSQL superuser).
-- The password comes from a psql variable, so it is never stored in this repository:
--   psql -h DB_HOST -U postgres -v mlflow_password="$MLFLOW_DB_PASSWORD" -f infra/mlflow/postgres-init.sql
-- MLflow creates and migrates its own tables on first start: the runs in `mlflow`, and the users and
-- permissions of `start-server.sh --basic-auth` in `mlflow_auth` (MLFLOW_AUTH_DATABASE_URI).
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
