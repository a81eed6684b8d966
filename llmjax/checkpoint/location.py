"""Where things are in a run directory or an export, for local paths and URLs alike.

Paths come from llmjax/paths.py (the one path abstraction: `etils.epath.Path`, what orbax
uses, never pathlib, which would turn `gs://bucket/run` into the local directory
`gs:/bucket/run`); `paths.absolute` makes local ones absolute, as checkpoints record them.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from etils import epath

from llmjax import paths
from llmjax.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"  # run_dir/checkpoints/<step>/
PathLike = Any  # str, os.PathLike or epath.Path


def step_numbers(directory: epath.Path) -> list[int]:
    """The steps of a checkpoints/ directory: its subdirectories named by a number, sorted
    (uncommitted `<step>.orbax-checkpoint-tmp-*` saves are not among them)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def read_json(path: epath.Path, what: str) -> Any:
    """A JSON file of a checkpoint; missing or truncated is a CheckpointError naming it."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {what} is incomplete")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is truncated or not JSON: {err}") from None


def read_step_meta(step_dir: epath.Path) -> dict:
    """The meta item (resolved config, tokenizer, mesh, base reference) of a step directory."""
    return read_json(step_dir / "meta" / "metadata", f"checkpoint {step_dir}")


def resolve_source(path: PathLike, allow_base_ref: bool = False
                   ) -> tuple[epath.Path, list[str], dict]:
    """(orbax tree dir, subtrees holding params, config dict) of a run dir (its latest
    checkpoint), a checkpoint step dir or a parameter export.

    A PEFT run's checkpoint that references its base (llmjax/peft/base_ref.py) does not hold
    the frozen base leaves: reading it as a parameter source is an error unless the caller
    follows the reference (`allow_base_ref`, as the run loader does)."""
    from llmjax.checkpoint.params import read_config
    path = paths.absolute(path, "init_from")
    if not path.exists():
        raise FileNotFoundError(f"init_from={str(path)!r} does not exist")
    if (path / CHECKPOINT_DIR).is_dir():
        steps = step_numbers(path / CHECKPOINT_DIR)
        if not steps:
            raise CheckpointError(f"{path / CHECKPOINT_DIR} holds no finished checkpoint")
        path = path / CHECKPOINT_DIR / str(steps[-1])
    if (path / "state").is_dir():
        meta = read_step_meta(path)
        if meta.get("base") and not allow_base_ref:
            raise CheckpointError(
                f"{path} is a PEFT checkpoint that references its base "
                f"{meta['base'].get('path')} instead of storing it: export the fine-tuned "
                f"model first (llmjax export {path} OUT) and use OUT")
        return path / "state", ["params", "frozen"], meta.get("config", {})
    if (path / "params").is_dir() or (path / "config.yaml").exists():
        config = read_config(path)
        if not (path / "params").is_dir():
            raise CheckpointError(f"{path / 'params'} is missing: the parameter export is "
                                  f"incomplete")
        return path / "params", [], config
    raise CheckpointError(f"init_from={str(path)!r} is neither a run directory (with "
                          f"{CHECKPOINT_DIR}/), a checkpoint step directory (with state/) nor a "
                          f"parameter export (with params/ and config.yaml)")


def step_dir_of(run: PathLike, step: Optional[int] = None) -> epath.Path:
    """The checkpoint step directory of a run (latest, or `step`); a step dir is itself."""
    run = paths.absolute(run, "run")
    if (run / "state").is_dir() and step is None:
        return run
    directory = run / CHECKPOINT_DIR
    if not directory.is_dir():
        raise CheckpointError(f"{run} is not a run directory (no {CHECKPOINT_DIR}/): pass the "
                              f"train.run_dir of a run")
    steps = step_numbers(directory)
    if not steps:
        raise CheckpointError(f"{directory} holds no finished checkpoint")
    if step is None:
        return directory / str(steps[-1])
    if step not in steps:
        raise CheckpointError(f"{run} has no checkpoint at step {step} (steps: "
                              f"{', '.join(map(str, steps))})")
    return directory / str(step)
