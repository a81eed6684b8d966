#!/usr/bin/env bash
# Run `llmjax train CONFIG [overrides]` on every worker of the slice, once. For a run that is
# relaunched after preemption (exit code 75) within a restart budget, use
# `llmjax launch tpu-vm ... --existing` (docs/pods.md).
# Usage: tpu/launch.sh CONFIG [section.key=value ...]
source "$(dirname "$0")/common.sh"
if [[ $# -lt 1 ]]; then echo "usage: $0 CONFIG [section.key=value ...]" >&2; exit 2; fi
args=$(printf ' %q' "$@")
# Detached (SIGHUP ignored, like nohup): a dropped ssh connection stops nothing. The exit code
# lands in ~/llmjax-exit-code (docs/pods.md: 0 done, 2 user error, 75 preempted, 1 relaunch).
tpu_ssh all "cd ~/$REMOTE_DIR && rm -f ~/llmjax-exit-code && (trap '' HUP; python3 -m llmjax \
train$args > ~/llmjax-train.log 2>&1; echo \$? > ~/llmjax-exit-code) > /dev/null 2>&1 < /dev/null &"
echo "launched on every worker of $TPU_NAME; streaming worker 0 (Ctrl-C stops the stream, not the run)" >&2
tpu_ssh 0 "tail -n +1 -f ~/llmjax-train.log"
