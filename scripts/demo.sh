#!/usr/bin/env bash
# `make demo`: the main job on the embedded default. Set-up (.venv) is done by make; this script generates
# SynthTalk, runs the DVC pipeline (preprocessing + every training stage built so far, on the tiny preset, local
# Ray, sqlite MLflow) and prints where everything is. Re-running it only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/edtalk-torch-extensions}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu  # DeepSpeed on CPU (gloo)
fi

start=$(date +%s)
# The stages of dvc.yaml whose code exists: the pipeline grows as stages land; `dvc repro` of the last one runs
# everything before it.
mapfile -t built < <(python - <<'PY'
from pipelines.train import stages
order = ["autoencoder", "mouth_pose", "eye", "expression", "syncnet", "audio_lip", "audio_pose", "audio_eye",
         "audio_expression"]
for name in order:
    if name in stages.STAGES:
        print(name)
PY
)
targets=("synth" "preprocess" "${built[@]}")
have_cmd() { python -c "import importlib, sys; importlib.import_module('pipelines.commands.$1')" 2>/dev/null; }
if [ "${#built[@]}" -eq 9 ] && have_cmd evaluate; then targets+=("evaluate"); fi
if [ "${#built[@]}" -eq 9 ] && have_cmd generate; then targets+=("render"); fi

echo "== edtalk demo: dvc repro ${targets[*]}"
# One MLflow parent run for this invocation: the stage runs DVC starts nest under it (pipelines/pipeline_run.py).
EDTALK_PARENT_RUN_ID=$(python -m pipelines.pipeline_run start --name "make demo" --targets "${targets[*]}" | tail -n1)
export EDTALK_PARENT_RUN_ID
outcome=FAILED
trap 'python -m pipelines.pipeline_run end "$EDTALK_PARENT_RUN_ID" "$outcome" || true' EXIT
dvc repro "${targets[@]}"
outcome=FINISHED

echo
echo "== done in $(( $(date +%s) - start )) s"
echo "SynthTalk clips     data/raw/synthtalk/"
echo "Parquet tables      data/processed/ (segments, pairs, rejects, _stats.json)"
for s in "${built[@]}"; do
  echo "stage ${s}$(printf '%*s' $((14 - ${#s})) '')models/${s}/ (EDTalk.from_pretrained), metrics/${s}.json"
done
[ -f metrics/evaluate.json ] && echo "evaluation          metrics/evaluate.json"
[ -f outputs/demo/render.mp4 ] && echo "generated video     outputs/demo/render.mp4"
echo "Ray checkpoints     outputs/ray/"
echo "DVC                 dvc dag; dvc metrics show; dvc params diff"
echo "MLflow              mlflow ui --backend-store-uri ${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}   (then open http://127.0.0.1:5000)"
echo "                    parent run ${EDTALK_PARENT_RUN_ID} holds this invocation's stage runs"
