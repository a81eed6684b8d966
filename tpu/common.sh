# Shared settings for the tpu/ scripts (sourced, not run).
# DRY_RUN=1 prints each gcloud command instead of running it.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME (e.g. llmjax-v5e-16)}"
: "${ZONE:?set ZONE (e.g. us-west4-a)}"
ACCELERATOR="${ACCELERATOR:-v5litepod-8}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
WHERE=(--zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then WHERE+=(--project "$PROJECT"); fi
REMOTE_DIR="${REMOTE_DIR:-llmjax}"
# Spot capacity goes through a queued resource (it waits for capacity instead of failing);
# QUEUED=1 queues on-demand capacity the same way.
if [[ "${SPOT:-0}" == 1 || "${QUEUED:-0}" == 1 ]]; then USE_QUEUE=1; else USE_QUEUE=0; fi
run() {  # run COMMAND...: or print it, shell-quoted, when DRY_RUN=1
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local out="" arg
    for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
    echo "${out% }"
  else
    "$@"
  fi
}
tpu_ssh() {  # tpu_ssh WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}
