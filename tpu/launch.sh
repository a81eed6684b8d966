#!/usr/bin/env bash
# Run `llmjax train CONFIG [overrides]` on every worker of the slice.
# Usage: tpu/launch.sh CONFIG [section.key=value ...]
source "$(dirname "$0")/common.sh"
if [[ $# -lt 1 ]]; then echo "usage: $0 CONFIG [section.key=value ...]" >&2; exit 2; fi
args=$(printf ' %q' "$@")
tpu_ssh all "cd ~/$REMOTE_DIR && nohup python3 -m llmjax train$args > ~/llmjax-train.log 2>&1 &"
echo "launched on every worker of $TPU_NAME; streaming worker 0 (Ctrl-C stops the stream, not the run)"
tpu_ssh 0 "tail -n +1 -f ~/llmjax-train.log"
