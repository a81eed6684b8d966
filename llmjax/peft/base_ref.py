"""PEFT checkpoints reference the frozen base they started from instead of storing it again.

A run started from `train.init_from` with a PEFT method keeps most leaves frozen, and those
frozen leaves are exactly the base's (loaded by init_from, never updated: tested). Its
checkpoints therefore store the trainable tree, the optimizer state and only the frozen
leaves that did not come from the base (e.g. a new head left frozen), plus a `BaseRef`:
the base's resolved path (a checkpoint step directory or a parameter export), the frozen
leaves taken from it and a content fingerprint. Resume restores those leaves from the base
with the run's shardings and checks the fingerprint, so a moved, replaced or retrained base
is a one-line CheckpointError, never a silent load of other weights.

Fingerprint: two position-weighted 32-bit sums of each leaf's raw bits, computed on the
devices in one jitted pass over the (sharded) frozen leaves; only 8 bytes per leaf reach
the host, where sha256 combines them with the leaf paths, shapes and dtypes. Integer sums
wrap exactly, so the result does not depend on the mesh or the reduction order. Cost: one
read of the frozen weights at the start of the run and once per resume (memory-bound: ~15 ms
for 7B bf16 on one accelerator's HBM, a few seconds on CPU), nothing per save.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from llmjax import paths
from llmjax.checkpoint.location import resolve_source
from llmjax.checkpoint.trees import is_position_table, restore_leaves, tree_metadata
from llmjax.errors import CheckpointError
from llmjax.tree import flatten, unflatten

META_KEY = "base"  # key of the reference in a checkpoint's meta item


@dataclasses.dataclass
class BaseRef:
    """Where the frozen base of a PEFT run lives, which frozen leaves come from it, and
    the fingerprint of those leaves as the run used them."""

    source: str  # train.init_from as given (a run dir, step dir or export)
    path: str  # what it resolved to when the run started (step dir or export dir)
    leaves: list  # '/'-joined parameter paths of the frozen leaves taken from the base
    fingerprint: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> Optional["BaseRef"]:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)}) if data else None

    def stored(self, frozen: dict) -> dict:
        """The frozen leaves a checkpoint stores: those not from the base."""
        return _without(frozen, set(self.leaves))


# ---------------------------------------------------------------- fingerprint

_PRIMES = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C, 0xFD7046C5)


def _leaf_sums(x: jax.Array) -> jax.Array:
    """[2] uint32: sum(bits * w) and sum((bits ^ w) * c) with odd position weights w."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing dim of 2
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        bits = bits.astype(jnp.uint32)
    w = jnp.zeros(bits.shape, jnp.uint32)
    for d in range(bits.ndim):
        w = w + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(
            _PRIMES[d % len(_PRIMES)] + 2 * d)
    w = w * jnp.uint32(2) + jnp.uint32(1)
    s1 = jnp.sum(bits * w, dtype=jnp.uint32)
    s2 = jnp.sum((bits ^ w) * jnp.uint32(0x85EBCA6B), dtype=jnp.uint32)
    return jnp.stack([s1, s2])


def fingerprint(flat: dict[str, Any]) -> str:
    """sha256 (hex) over each leaf's path, shape, dtype and on-device bit sums."""
    keys = sorted(flat)
    sums = jax.device_get(jax.jit(lambda xs: [_leaf_sums(x) for x in xs])(
        [flat[k] for k in keys]))
    rows = [[k, list(flat[k].shape), str(np.dtype(flat[k].dtype)), [int(v) for v in s]]
            for k, s in zip(keys, sums)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# ---------------------------------------------------------------- start of a run

def reference(source: str, frozen: dict, report) -> Optional[BaseRef]:
    """The BaseRef of a run just initialised from `source` (train.init_from), or None when
    no frozen leaf came from it (full fine-tuning: nothing to reference)."""
    flat = flatten(frozen)
    leaves = sorted(k for k in set(report.loaded) if k in flat)
    if not leaves:
        return None
    tree_dir, _, _ = resolve_source(source)
    return BaseRef(source=str(source), path=str(tree_dir.parent), leaves=leaves,
                   fingerprint=fingerprint({k: flat[k] for k in leaves}))


# ---------------------------------------------------------------- resume

def restore_frozen(ref: BaseRef, abstract_frozen: dict, frozen_shardings: dict,
                   stored: dict, where: str, init_from: str = "") -> dict:
    """The full frozen tree of a checkpoint: its `stored` leaves plus ref.leaves read from the
    base (the recorded path, else `init_from` when the base moved), fingerprint-checked.

    abstract_frozen / frozen_shardings: the run's frozen tree of ShapeDtypeStructs and its
    shardings (the same layout a fresh start gives)."""
    wanted = flatten(abstract_frozen)
    shardings = flatten(frozen_shardings)
    missing = [k for k in ref.leaves if k not in wanted]
    if missing:
        raise CheckpointError(f"{where} references base leaves this model does not have "
                              f"({', '.join(missing[:4])}): resume with the run's own config")
    candidates = [ref.path]
    if init_from:
        candidates.append(str(init_from))
    seen, tried = set(), []
    for candidate in candidates:
        path = paths.absolute(candidate, "base")
        if not path.exists():
            tried.append(f"{path} is missing")
            continue
        try:
            tree_dir = _resolve_quiet(path)
        except CheckpointError as err:
            tried.append(str(err))
            continue
        if tree_dir in seen:
            continue
        seen.add(tree_dir)
        try:
            leaves = load_leaves(tree_dir, {k: wanted[k] for k in ref.leaves},
                                 {k: shardings[k] for k in ref.leaves}, where)
        except CheckpointError as err:  # another model there: try the next candidate
            tried.append(str(err).splitlines()[0])
            continue
        got = fingerprint(leaves)
        if got == ref.fingerprint:
            flat = flatten(stored)
            flat.update(leaves)
            return unflatten(flat)
        tried.append(f"{tree_dir.parent} has fingerprint {got[:12]}")
        del leaves
    raise CheckpointError(
        f"{where} continues a PEFT run on base {ref.path} (fingerprint {ref.fingerprint[:12]}), "
        f"which is missing or changed ({'; '.join(tried)}): put that base back, or set "
        f"train.init_from to where the same base now lives (it is fingerprint-checked); a "
        f"different base cannot continue this run")


def restore_frozen_single(ref: BaseRef, model_cfg, stored: dict, where: str,
                          init_from: str = "") -> dict:
    """restore_frozen onto the default device, shapes from the run's (hooked) model config:
    for readers of a run (from_pretrained, export) that have no Experiment."""
    from llmjax.models.api import abstract_params
    abstract = flatten(abstract_params(model_cfg, boxed=False))
    wanted = {k: abstract[k] for k in ref.leaves if k in abstract}
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return restore_frozen(ref, unflatten(wanted), unflatten({k: single for k in wanted}), stored,
                          where, init_from)


def _resolve_quiet(path: epath.Path) -> epath.Path:
    """The orbax tree directory of a step dir, export or run dir (latest step)."""
    return resolve_source(path, allow_base_ref=True)[0]


def load_leaves(tree_dir: epath.Path, wanted: dict[str, Any], shardings: dict[str, Any],
                where: str) -> dict[str, jax.Array]:
    """{path: array} of `wanted` (ShapeDtypeStructs) read from an orbax tree dir (a run's
    state/ or an export's params/), exactly as init_from builds them: learned position tables
    cut to the wanted length, other dtypes cast; placed with `shardings`."""
    saved = tree_metadata(tree_dir)
    prefixes = ["params", "frozen"] if tree_dir.name == "state" else []
    source: dict[str, tuple[str, Any]] = {}
    for prefix in reversed(prefixes):  # earlier prefixes win
        for key, meta in saved.items():
            if key.startswith(prefix + "/"):
                source[key[len(prefix) + 1:]] = (key, meta)
    if not prefixes:
        source = {key: (key, meta) for key, meta in saved.items()}
    target, fix = {}, {}
    for key, leaf in wanted.items():
        if key not in source:
            raise CheckpointError(f"{where}: base {tree_dir.parent} has no leaf {key}: it is "
                                     f"not the base this run started from")
        tree_key, meta = source[key]
        shape, saved_shape = tuple(leaf.shape), tuple(meta.shape)
        sharding = shardings[key]
        if shape != saved_shape:
            if not (is_position_table(key) and shape[1:] == saved_shape[1:]
                    and saved_shape[0] >= shape[0]):
                raise CheckpointError(f"{where}: base {tree_dir.parent} leaf {key} has shape "
                                         f"{saved_shape}, the run has {shape}")
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()) \
                if hasattr(sharding, "mesh") else sharding
        if shape != saved_shape or np.dtype(meta.dtype) != np.dtype(leaf.dtype):
            fix[key] = leaf
        target[tree_key] = jax.ShapeDtypeStruct(saved_shape, meta.dtype, sharding=sharding)
    restored = flatten(restore_leaves(tree_dir, target))
    out = {key: restored[source[key][0]] for key in wanted}
    if fix:  # the init_from path: cut to max_len, then cast (one jit, placed like the run)
        def adjust(arrays):
            return {k: v[tuple(slice(0, n) for n in fix[k].shape)].astype(fix[k].dtype)
                    for k, v in arrays.items()}
        out.update(jax.jit(adjust, out_shardings={k: shardings[k] for k in fix})(
            {k: out[k] for k in fix}))
    return out


def read_ref(step_dir) -> Optional[BaseRef]:
    """The BaseRef recorded in a checkpoint step directory's meta (None: self-contained)."""
    path = paths.absolute(step_dir) / "meta" / "metadata"
    if not path.exists():
        return None
    try:
        return BaseRef.from_dict(json.loads(path.read_text()).get(META_KEY))
    except ValueError:
        return None


def _without(tree: dict, keys: set) -> dict:
    return unflatten({k: v for k, v in flatten(tree).items() if k not in keys})
