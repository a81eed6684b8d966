# Shared settings for the tpu/ scripts (sourced, not run).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME (e.g. llmjax-v5e-16)}"
: "${ZONE:?set ZONE (e.g. us-west4-a)}"
ACCELERATOR="${ACCELERATOR:-v5litepod-8}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi
REMOTE_DIR="${REMOTE_DIR:-llmjax}"
tpu_ssh() {  # tpu_ssh WORKER COMMAND
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker="$1" --command="$2"
}
