#!/usr/bin/env bash
# Delete the slice. Checkpoints written to a gs:// run_dir are kept.
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --quiet
