#!/usr/bin/env bash
# Create a TPU VM slice. SPOT=1 asks for spot capacity (cheaper, preemptible).
source "$(dirname "$0")/common.sh"
extra=()
if [[ "${SPOT:-0}" == 1 ]]; then extra+=(--spot); fi
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
  --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${extra[@]}"
