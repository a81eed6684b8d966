#!/usr/bin/env bash
# Create a TPU VM slice. SPOT=1: spot capacity (cheaper, preemptible) through a queued
# resource; QUEUED=1: on-demand capacity through a queued resource (waits for capacity).
source "$(dirname "$0")/common.sh"
if [[ "$USE_QUEUE" == 1 ]]; then
  extra=()
  if [[ "${SPOT:-0}" == 1 ]]; then extra+=(--spot); fi
  run gcloud compute tpus queued-resources create "$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" --node-id "$TPU_NAME" \
    "${extra[@]}"
  echo "queued; the slice is usable once this prints ACTIVE:" >&2
  run gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
    --format 'value(state.state)'
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
