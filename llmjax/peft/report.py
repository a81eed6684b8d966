"""What trains: parameter counts per group (%, of the whole model) and optimizer-state bytes."""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np

from llmjax.tree import flatten_parts, path_str

GROUPS = ("lora", "ia3", "adapters", "prompt", "prefix", "base")


def group_of(path: tuple) -> str:
    """Which kind of trainable leaf: a PEFT method's own, or a base model leaf."""
    if path[-1] in ("lora_a", "lora_b"):
        return "lora"
    if path[-2:] == ("ia3", "scale"):
        return "ia3"
    if any(str(k).endswith("_adapter") for k in path):
        return "adapters"
    if path == ("prompt",):
        return "prompt"
    if path[-1] in ("prefix_key", "prefix_value"):
        return "prefix"
    return "base"


def count(tree: Any) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def nbytes(tree: Any) -> int:
    return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape")))


def summary(trainable: Any, frozen: Any, opt_state: Optional[Any] = None,
            method: str = "") -> str:
    """A few lines for the start of fine-tuning: trainable count and % per group, frozen
    count, optimizer-state bytes (measured from `opt_state`, else Adam's 2 moments)."""
    flat = flatten_parts(trainable)
    groups: dict[str, int] = {}
    examples: dict[str, str] = {}
    for path, leaf in flat.items():
        g = group_of(path)
        groups[g] = groups.get(g, 0) + math.prod(leaf.shape)
        examples.setdefault(g, path_str(path))
    n_train, n_frozen = count(trainable), base_count(frozen)
    total = max(n_train + n_frozen, 1)
    pct = lambda n: f"{100.0 * n / total:.3g}%"  # noqa: E731
    head = f"peft {method}: " if method else "peft: "
    lines = [f"{head}{n_train:,} trainable of {total:,} parameters ({pct(n_train)}); "
             f"{n_frozen:,} frozen"]
    for g in GROUPS:
        if g in groups:
            lines.append(f"  {g:<9}{groups[g]:>14,}  {pct(groups[g]):>8}   e.g. {examples[g]}")
    if opt_state is not None:
        opt = nbytes(opt_state)
        how = "measured"
    else:
        opt = 2 * nbytes(trainable)
        how = "estimated: Adam's 2 moments"
    full = 2 * (nbytes(trainable) + nbytes(frozen))
    lines.append(f"  optimizer state {_human(opt)} ({how}); full fine-tuning with Adam: "
                 f"~{_human(full)}")
    return "\n".join(lines)


def base_count(frozen: Any) -> int:
    """Frozen parameters as the model sees them: a QLoRA-quantized leaf counts its weights
    (codes hold two nf4 weights per byte; scales are not parameters), a dpo reference copy
    (peft/reference.py) is not counted."""
    from llmjax.peft.quantize import CODES, LEAVES
    from llmjax.peft.reference import REFERENCE
    n = 0
    for path, leaf in flatten_parts(frozen).items():
        if path[0] == REFERENCE or (path[-1] in LEAVES and path[-1] != CODES):
            continue
        size = math.prod(leaf.shape)
        n += 2 * size if path[-1] == CODES and str(leaf.dtype) == "uint8" else size
    return n


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
