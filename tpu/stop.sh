#!/usr/bin/env bash
# Delete the slice (and its queued resource, for SPOT=1 / QUEUED=1). Checkpoints written to a
# gs:// run_dir are kept.
source "$(dirname "$0")/common.sh"
if [[ "$USE_QUEUE" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
fi
