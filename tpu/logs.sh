#!/usr/bin/env bash
# Follow one worker's training log: tpu/logs.sh [WORKER]
source "$(dirname "$0")/common.sh"
tpu_ssh "${1:-0}" "tail -n 200 -f ~/llmjax-train.log"
