#!/usr/bin/env bash
# Copy this checkout to every worker and install llmjax with the TPU extra.
source "$(dirname "$0")/common.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -d)/llmjax.tar.gz"
run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/llmjax.tar.gz" "${WHERE[@]}" --worker=all
if [[ -d "$root/tokenizers" ]]; then  # trained tokenizers are not in git: copy them too
  run tar -czf "${archive%.tar.gz}-tok.tar.gz" -C "$root" tokenizers
  run gcloud compute tpus tpu-vm scp "${archive%.tar.gz}-tok.tar.gz" "$TPU_NAME:~/llmjax-tok.tar.gz" \
    "${WHERE[@]}" --worker=all
  tpu_ssh all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/llmjax-tok.tar.gz -C ~/$REMOTE_DIR"
fi
tpu_ssh all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/llmjax.tar.gz -C ~/$REMOTE_DIR && \
  cd ~/$REMOTE_DIR && python3 -m pip install -q -e '.[tpu]' && python3 -c 'import jax; print(jax.device_count(), \"devices\")'"
