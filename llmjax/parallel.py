"""Device mesh, logical-axis rules and the NamedShardings derived from them.

Model code names axes (`embed`, `heads`, `mlp`, `vocab`, ...); this module
alone says how those names map onto mesh axes (`data`, `fsdp`, `expert`, `context`, `tensor`). The
`expert` axis splits MoE experts; outside the experts it splits the batch like `data`. The
`context` axis splits the sequence (the `length` dimension of activations and of the batch's
token arrays): context parallelism, docs/long-context.md.
`jax.jit` with NamedSharding in/out shardings is today's pjit.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.config import ConfigError, MeshConfig
from llmjax.tree import path_str

log = logging.getLogger(__name__)

# Outermost first: the inner axes get the fastest links (ICI rings on TPU). `context` sits
# inside the batch axes and outside `tensor`, whose per-layer collectives are the most frequent.
MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")
# Batch arrays whose second dimension is the sequence (train.seq_len): split over `context`.
SEQUENCE_KEYS = ("tokens", "segment_ids", "positions", "loss_mask", "token_types",
                 "chosen", "chosen_mask", "rejected", "rejected_mask")

# Ordered: the first rule whose mesh axis is still free in a given array wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    # Inside an MoE layer the expert dimension takes the expert axis, its rows the rest.
    ("expert", "expert"),
    ("expert_batch", ("data", "fsdp")),
    ("length", "context"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("position", None),
    ("token_types", None),
    ("relpos_buckets", None),
    ("classes", None),
    ("prompt", None),
    ("prefix", None),
    ("adapter", None),
    ("lora", None),
)


def rules_from_config(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    """The rules table: config overrides first (they win), then the defaults."""
    custom = []
    for rule in cfg.rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2):
            raise ConfigError(f"mesh.rules entry {rule!r} must be [logical_name, mesh_axis]")
        name, axis = rule
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        for a in axes:
            if a is not None and a not in MESH_AXES:
                raise ConfigError(f"mesh.rules: {name!r} maps to unknown mesh axis {a!r}; "
                                  f"use one of {MESH_AXES} or null")
        custom.append((name, tuple(axis) if isinstance(axis, list) else axis))
    return tuple(custom) + DEFAULT_RULES


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, expert, context, tensor): resolve -1 ("the rest"), check the product
    equals the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.context, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1) * cfg.dcn_data
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh: fixed axes (product {known}) do not divide the {num_devices} devices; "
                f"choose mesh sizes whose product divides {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) * cfg.dcn_data != num_devices:
        raise ConfigError(
            f"mesh: data*fsdp*expert*context*tensor*dcn_data = {math.prod(sizes) * cfg.dcn_data} but there are "
            f"{num_devices} devices; set one axis to -1 or make the product {num_devices}")
    sizes[0] *= cfg.dcn_data
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp, expert, context, tensor) mesh; multi-slice meshes fold DCN parallelism
    into `data`."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    if cfg.dcn_data > 1:
        ici = (shape[0] // cfg.dcn_data,) + tuple(shape[1:])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (cfg.dcn_data,) + (1,) * (len(MESH_AXES) - 1), devices)
    else:
        try:  # topology-aware placement on TPU/GPU (ICI rings for the inner axes)
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Device sets it has no topology for (a subset of CPU devices, odd shapes):
            # plain row-major order is as good as any.
            grid = np.asarray(devices).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def single_device_mesh() -> Mesh:
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


def _spec_for(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
              rules: Sequence[tuple[str, Any]], where: str) -> P:
    """PartitionSpec for one array: first free rule per logical name, divisibility checked."""
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, names):
        chosen = None
        for logical, axis in rules:
            if logical != name:
                continue
            axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
            if any(a in used for a in axes):
                continue  # taken by an earlier dimension: try the next rule for this name
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if not axes:
                break
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                if name == "heads":
                    raise ConfigError(
                        f"{where}: {dim} heads do not divide mesh axes {axes} of size {size}; "
                        f"choose mesh.tensor among the divisors of the head count")
                # Expected for MQA/GQA key/value heads; worth a warning for anything else.
                (log.debug if name == "kv_heads" else log.warning)(
                    "%s: dimension %s (%d) not divisible by %s=%d; replicating it",
                    where, name, dim, axes, size)
                chosen = None
                break
            chosen = axes if len(axes) > 1 else axes[0]
            used.update(axes)
            break
        out.append(chosen)
    return P(*out)


def param_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a boxed (nn.Partitioned) abstract parameter tree."""
    names = nn.get_partition_spec(abstract_boxed)
    shapes = nn.unbox(abstract_boxed)

    def one(path, spec, leaf):
        where = path_str(path)
        spec = tuple(spec) if spec is not None else (None,) * len(leaf.shape)
        return NamedSharding(mesh, _spec_for(spec, leaf.shape, mesh, rules, where))

    return jax.tree_util.tree_map_with_path(
        one, names, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def logical_shardings(tree_of_names: Any, tree_of_shapes: Any, mesh: Mesh, rules) -> Any:
    """Like param_shardings, for an unboxed tree plus a matching tree of logical names."""
    def one(path, spec, leaf):
        where = path_str(path)
        return NamedSharding(mesh, _spec_for(tuple(spec), leaf.shape, mesh, rules, where))
    return jax.tree_util.tree_map_with_path(
        one, tree_of_names, tree_of_shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data, fsdp and expert; everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shardings(mesh: Mesh, keys) -> dict[str, NamedSharding]:
    """One sharding per batch array: rows over the batch axes; the token-level arrays
    (SEQUENCE_KEYS, [batch, seq_len]) also split their sequence over `context`."""
    rows = batch_sharding(mesh)
    if mesh.shape["context"] == 1:
        return {k: rows for k in keys}
    tokens = NamedSharding(mesh, P(BATCH_AXES, "context"))
    return {k: tokens if k in SEQUENCE_KEYS else rows for k in keys}


def _dict_path(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def mirror_shardings(tree: Any, params: Any, param_sh: Any, mesh: Mesh) -> Any:
    """Shardings for a tree (optimizer state) whose leaves mirror params by path and shape.

    A leaf whose trailing dict path and shape match a parameter gets that
    parameter's sharding (Adam moments, Lion momentum); anything else (step
    counters, Adafactor's factored moments) is replicated.
    """
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat[_dict_path(path)] = (leaf.shape, None)
    for path, sh in jax.tree_util.tree_flatten_with_path(param_sh)[0]:
        key = _dict_path(path)
        flat[key] = (flat[key][0], sh)

    def one(path, leaf):
        key = _dict_path(path)
        for start in range(len(key)):
            hit = flat.get(key[start:])
            if hit and hit[0] == getattr(leaf, "shape", None):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: data * fsdp * expert."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_axes_label(mesh: Mesh) -> str:
    """'data*fsdp', or 'data*fsdp*expert' on a mesh with an expert axis (for messages)."""
    return "data*fsdp*expert" if mesh.shape["expert"] > 1 else "data*fsdp"


def shard_batch_spec(mesh: Mesh, global_batch: int) -> None:
    """Fail early when the global batch does not divide over data*fsdp*expert."""
    n = batch_shards(mesh)
    if global_batch % n:
        raise ConfigError(f"train.batch_size={global_batch} must be divisible by mesh "
                          f"{batch_axes_label(mesh)}={n}")


def initialize_distributed() -> bool:
    """jax.distributed.initialize when launched as one of several processes (explicit
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID or their LLMJAX_* names, or a
    detected TPU VM / GKE / SLURM / Open MPI cluster); see llmjax/distributed.py."""
    from llmjax import distributed
    return distributed.initialize()
