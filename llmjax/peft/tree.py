"""Flat views of parameter trees: {path tuple: leaf} <-> nested dicts, and path strings."""
from __future__ import annotations

from typing import Any

from flax import traverse_util


def flatten(tree: Any) -> dict[tuple, Any]:
    """{('decoder', 'layers', 'mlp', 'wo', 'kernel'): leaf, ...}; empty subtrees vanish."""
    if not tree:
        return {}
    return traverse_util.flatten_dict(dict(tree))


def unflatten(flat: dict[tuple, Any]) -> dict:
    if not flat:
        return {}
    return _plain(traverse_util.unflatten_dict(flat))


def _plain(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def path_str(path: tuple) -> str:
    """'/'-joined path, the form peft.targets and peft.trainable regexes search."""
    return "/".join(str(k) for k in path)


def is_scanned(path: tuple) -> bool:
    """Leaves under a scanned stack ('layers') carry a leading layer axis."""
    return "layers" in path
