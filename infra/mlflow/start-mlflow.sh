#!/usr/bin/env bash
# Start the MLflow tracking server with basic auth: runs/metrics in PostgreSQL, artifacts proxied to object storage.
# The Kubernetes Deployment (infra/k8s/mlflow/mlflow.yaml) runs this script, and so does the services test
# (tests/services.py) against loopback PostgreSQL and S3, so what is deployed is what is tested.
#
# Environment (all required unless a default is shown):
#   MLFLOW_BACKEND_STORE_URI        postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI        postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow_auth (users, permissions)
#   MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/PREFIX (the server holds the S3 credentials; clients need none)
#   MLFLOW_AUTH_ADMIN_PASSWORD      password of the `admin` user created on first start (ignored afterwards)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  static secret for CSRF protection (the same in every replica)
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and MLFLOW_S3_ENDPOINT_URL for a non-AWS S3 (MinIO, Ceph, ...)
#   MLFLOW_HOST=0.0.0.0  MLFLOW_PORT=5000  MLFLOW_WORKERS=2  MLFLOW_ALLOWED_HOSTS=(mlflow's default)
#   MLFLOW_AUTH_CONFIG_DIR=/tmp     where the generated basic_auth.ini goes (it holds secrets: mode 600)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false   MLflow's server-side job runner (unused here)
set -euo pipefail

for var in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI MLFLOW_ARTIFACTS_DESTINATION \
  MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
  if [ -z "${!var:-}" ]; then
    echo "start-mlflow.sh: $var is not set; see the header of this script for what it must hold" >&2
    exit 2
  fi
done

config_dir="${MLFLOW_AUTH_CONFIG_DIR:-/tmp}"
mkdir -p "$config_dir"
ini="$config_dir/basic_auth.ini"
umask 077
cat >"$ini" <<EOF
[mlflow]
# Authenticated users may read everything; they manage what they create; admins manage users.
default_permission = READ
database_uri = $MLFLOW_AUTH_DATABASE_URI
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Each credential check is a deliberately slow password hash; cache a verified one for a minute.
auth_cache_ttl_seconds = 60
EOF
export MLFLOW_AUTH_CONFIG_PATH="$ini"  # the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD
# MLflow 3's server-side job runner (GenAI evaluation, trace roll-ups) starts a pool of ~250 MB consumers; this
# pipeline uses none of it. Set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to get it back.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

args=(
  server
  --app-name basic-auth
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --host "${MLFLOW_HOST:-0.0.0.0}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-2}"
)
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec "${MLFLOW_BIN:-mlflow}" "${args[@]}"
