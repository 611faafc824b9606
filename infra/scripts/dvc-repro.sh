#!/usr/bin/env bash
# Run the DVC pipeline up to TARGET against the S3 DVC remote, as the pipeline RayJob does
# (infra/k8s/ray/rayjob-pipeline.yaml); the stages' `edtalk` commands reach the cluster through RAY_ADDRESS.
#
#   infra/scripts/dvc-repro.sh TARGET [-S section.key=value ...]
#
# -S overrides are recorded in the DVC experiment (dvc exp run), so the run's params stay traceable.
# Environment: DVC_REMOTE_URL (s3://bucket/prefix), AWS_ENDPOINT_URL (optional, non-AWS S3), AWS credentials.
set -euo pipefail

target="${1:?usage: dvc-repro.sh TARGET [-S section.key=value ...]}"
shift
: "${DVC_REMOTE_URL:?DVC_REMOTE_URL must name the DVC remote, e.g. s3://edtalk-data/dvc}"

# The remote goes into .dvc/config.local: site settings never change the tracked .dvc/config.
dvc remote add --local --force --default cluster "$DVC_REMOTE_URL"
if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
  dvc remote modify --local cluster endpointurl "$AWS_ENDPOINT_URL"
fi

# Fetch what the remote has (inputs, and outputs of stages that are already up to date, so they are skipped).
dvc pull --allow-missing --force
dvc exp run "$@" "$target"
dvc push
echo "dvc-repro.sh: $target done; outputs pushed to $DVC_REMOTE_URL"
