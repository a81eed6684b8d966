"""Is a committed checkpoint step complete? A save that was cut off (a process killed while
writing to object storage, where there is no atomic rename), a lost object or a damaged disk
can leave a step directory that orbax lists but cannot restore. Resume skips such steps for
the newest complete one, saying which and why (llmjax/train/resume.py).

Checked from the files alone (cheap, and the same answer on every process): orbax's commit
marker and step metadata, the meta item, every process's data file, and the state tree's
metadata and OCDBT manifests. A missing or truncated array chunk shows only when it is read:
the restore reports it as a TornCheckpointError."""
from __future__ import annotations

import json
from typing import Optional

from etils import epath

from llmjax.checkpoint.data_state import file_name

COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, before the rename
STEP_METADATA = "_CHECKPOINT_METADATA"


def step_problem(step_dir: epath.Path) -> Optional[str]:
    """Why checkpoint `step_dir` is incomplete ('<file> is missing', '... is truncated'), or
    None when every file a restore needs first is there."""
    for name in (COMMIT_MARKER, STEP_METADATA):
        if not (step_dir / name).exists():
            return f"{step_dir / name} is missing (the save never committed)"
    meta_path = step_dir / "meta" / "metadata"
    if not meta_path.exists():
        return f"{meta_path} is missing"
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        return f"{meta_path} is truncated or not JSON ({err})"
    if not isinstance(meta, dict):
        return f"{meta_path} is not a JSON object"
    for index in range(int(meta.get("process_count") or 1)):
        path = step_dir / "data" / file_name(index)
        if not path.exists():
            return f"{path} is missing"
        try:
            json.loads(path.read_text())
        except ValueError as err:
            return f"{path} is truncated or not JSON ({err})"
    state = step_dir / "state"
    if not (state / "_METADATA").exists():
        return f"{state / '_METADATA'} is missing"
    try:
        json.loads((state / "_METADATA").read_text())
    except ValueError as err:
        return f"{state / '_METADATA'} is truncated or not JSON ({err})"
    if any(True for _ in state.glob("ocdbt.process_*")):  # OCDBT (orbax's default)
        for manifest in [state / "manifest.ocdbt"] + [p / "manifest.ocdbt"
                                                      for p in state.glob("ocdbt.process_*")]:
            if not manifest.exists():
                return f"{manifest} is missing"
    return None
