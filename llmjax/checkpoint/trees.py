"""Reading orbax PyTree directories (a run's state/, an export's params/) leaf by leaf:
their metadata, some leaves only, and which leaf is unreadable when a restore fails."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llmjax.errors import CheckpointError
from llmjax.tree import flatten, path_str, unflatten


class TornCheckpointError(CheckpointError):
    """A checkpoint's files are missing, truncated or unreadable (a save that never finished,
    a lost object, a damaged disk), as opposed to one that does not fit the run: resume skips
    it for an older complete one."""


def few(items: list, n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def is_position_table(key: str) -> bool:
    """Learned position embeddings (.../position/embedding): rows per position, which a model
    with a shorter max_len reads cut (init_from, a PEFT base, peft merge)."""
    parts = key.split("/")
    return len(parts) >= 2 and "position" in parts[-2]


def tree_metadata(directory: epath.Path) -> dict[str, Any]:
    """{leaf path: metadata with .shape/.dtype} of an orbax PyTree directory."""
    if not directory.exists():
        raise TornCheckpointError(f"{directory} is missing: the checkpoint is incomplete")
    if not (directory / "_METADATA").exists():
        raise TornCheckpointError(f"{directory / '_METADATA'} is missing: the checkpoint is "
                                  f"incomplete or was not written by orbax")
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(directory)
    except Exception as err:  # noqa: BLE001 (orbax/tensorstore raise many kinds)
        raise TornCheckpointError(f"cannot read the metadata of {directory}: "
                                  f"{type(err).__name__}: {err}") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return flatten(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def check_tree(saved: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Same leaf paths, shapes and dtypes, else a CheckpointError naming the leaves."""
    missing = [k for k in wanted if k not in saved]
    extra = [k for k in saved if k not in wanted]
    problems = []
    if missing:
        problems.append(f"{len(missing)} leaves missing from the checkpoint: {few(missing)}")
    if extra:
        problems.append(f"{len(extra)} leaves in the checkpoint but not in this model/optimizer: "
                        f"{few(extra)}")
    for key in wanted:
        if key in saved:
            s, w = saved[key], wanted[key]
            if tuple(s.shape) != tuple(w.shape):
                problems.append(f"leaf {key}: checkpoint shape {tuple(s.shape)} vs "
                                f"{tuple(w.shape)} in this config")
            elif np.dtype(s.dtype) != np.dtype(w.dtype):
                problems.append(f"leaf {key}: checkpoint dtype {np.dtype(s.dtype)} vs "
                                f"{np.dtype(w.dtype)} in this config")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match this run:\n  " +
                              "\n  ".join(problems[:20]) +
                              ("\n  ..." if len(problems) > 20 else ""))


def restore_leaves(tree_dir: epath.Path, target: dict[str, Any]) -> dict:
    """Restore only the leaves named in `target` ({'a/b/c': ShapeDtypeStruct with sharding})
    from an orbax PyTree checkpoint; returns them nested."""
    nested = unflatten(target)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(tree_dir, args=ocp.args.PyTreeRestore(
                nested, restore_args=jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), nested),
                partial_restore=True))
    except Exception as err:  # noqa: BLE001
        raise TornCheckpointError(diagnose(tree_dir, nested, err, partial=True)) from None


def diagnose(state_dir: epath.Path, target: dict, err: Exception, partial: bool = False) -> str:
    """Name the leaf that cannot be read: restore leaves one by one until one fails.

    Each try restores one leaf of the very tree that failed, the others replaced by orbax's
    PLACEHOLDER (skipped), so the tree structure (lists and tuples in optimizer states)
    matches the saved one. `partial`: `target` is a nested dict of some leaves only
    (init_from, run params), restored with partial_restore."""
    message = f"cannot read {state_dir}: {root_cause(err)}"
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            for i, (path, leaf) in enumerate(flat):
                key = path_str(path)
                if partial:
                    sub = unflatten({key: leaf})
                else:
                    leaves = [ocp.PLACEHOLDER] * len(flat)
                    leaves[i] = leaf
                    sub = jax.tree_util.tree_unflatten(treedef, leaves)
                restore_args = jax.tree.map(
                    lambda x: x if x is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(
                        sharding=x.sharding, dtype=x.dtype), sub)
                try:
                    checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                        sub, restore_args=restore_args, partial_restore=partial))
                except Exception as leaf_err:  # noqa: BLE001
                    return (f"cannot read leaf {key} {tuple(leaf.shape)} of {state_dir}: "
                            f"{root_cause(leaf_err)}")
    except Exception:  # noqa: BLE001 (diagnosis is best effort)
        pass
    return message


def root_cause(err: BaseException) -> str:
    """The innermost cause's message (tensorstore's 'OUT_OF_RANGE: Error reading ...' rather
    than orbax's wrapper holding the whole TensorStore spec), one line, bounded."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:400]}"
