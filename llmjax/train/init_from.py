"""`train.init_from`: a fresh train state (step 0, new optimizer state) whose parameters come
from a run directory, a checkpoint step directory or a parameter export, wherever the new
model has a leaf of the same path (fine-tuning: new heads initialised, old heads dropped)."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from llmjax import parallel
from llmjax.checkpoint.location import PathLike, resolve_source
from llmjax.checkpoint.run_meta import check_compatible
from llmjax.checkpoint.trees import few, is_position_table, restore_leaves, tree_metadata
from llmjax.config import ConfigError, ModelConfig, section_from_dict
from llmjax.errors import CheckpointError
from llmjax.models import abstract_params
from llmjax.tree import flatten, path_str, tree_names


@dataclasses.dataclass
class InitReport:
    """What `init_from` did with each parameter leaf of the new model."""

    source: str
    loaded: list = dataclasses.field(default_factory=list)
    new: list = dataclasses.field(default_factory=list)  # freshly initialised (e.g. new heads)
    dropped: list = dataclasses.field(default_factory=list)  # in the source, not in this model
    resized: list = dataclasses.field(default_factory=list)  # position tables cut to max_len
    cast: list = dataclasses.field(default_factory=list)  # loaded with another dtype
    overridden: list = dataclasses.field(default_factory=list)  # train.init_override fields
    runtime: list = dataclasses.field(default_factory=list)  # run-time model fields changed

    def summary(self) -> str:
        lines = [f"init_from {self.source}: {len(self.loaded)} leaves loaded, {len(self.new)} new "
                 f"(freshly initialised), {len(self.dropped)} dropped"]
        for title, items in (("new", self.new), ("dropped", self.dropped),
                             ("resized", self.resized), ("cast", self.cast),
                             ("override", self.overridden), ("run-time", self.runtime)):
            for item in items:
                lines.append(f"  {title:8s} {item}")
        return "\n".join(lines)


# ModelConfig fields that may differ between an init_from source and the new model: how
# the model runs (precision, memory, kernels, dropout, init of new leaves), its heads
# (new heads are initialised, old ones dropped: both listed) and the PEFT hooks. Every
# other field is architecture: same-shaped weights would compute something else.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl", "kernels",
                  "context_parallel", "context_load_balance",
                  "dropout", "initializer_range", "pooler", "mlm_head", "nsp_head", "num_labels",
                  "prompt_tokens", "prefix_tokens", "adapter_dim")
# Optional sizes compared by their effective value (None = the default derived size).
_EFFECTIVE = {"num_kv_heads": "kv_heads", "head_dim": "dim_per_head",
              "num_decoder_layers": "decoder_layers"}


def architecture_changes(saved_model: dict, model: ModelConfig, overrides, report,
                         where: str) -> list[str]:
    """Compare every ModelConfig field of the source with the target: run-time differences
    and train.init_override'd ones go to the report; returns the other differences (errors).
    A learned position table cut to a shorter max_len is allowed (and listed)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        source = section_from_dict(ModelConfig, {k: v for k, v in saved_model.items()
                                                 if k in known}, "model")
    except ConfigError as err:
        raise CheckpointError(f"{where}: its model config cannot be read: {err}") from None
    errors = []
    for name in sorted(known & set(saved_model)):
        attr = _EFFECTIVE.get(name, name)
        old, new = getattr(source, attr), getattr(model, attr)
        if old == new:
            continue
        change = f"model.{name} {old!r} -> {new!r}"
        if name in RUNTIME_FIELDS:
            report.runtime.append(change)
        elif name in overrides:
            report.overridden.append(change)
        elif name == "max_len" and model.position == "learned" and new < old:
            report.overridden.append(change + " (learned position table cut)")
        else:
            errors.append(change)
    return errors


def init_from(exp, path: PathLike):
    """A fresh TrainState of `exp` (step 0, new optimizer state) whose parameters come from
    `path` wherever this model has a leaf of the same path; returns (state, InitReport).

    Leaves only in the new model (new heads) keep their fresh initialisation, leaves only in
    the source (old heads) are dropped; learned position tables longer than this model's
    max_len are cut. Any other shape mismatch on a shared leaf is an error naming it.
    """
    tree_dir, prefixes, source_config = resolve_source(path)
    where = str(tree_dir.parent)
    check_compatible(source_config.get("model", {}), exp.model_config, where)
    saved = tree_metadata(tree_dir)
    source: dict[str, tuple[str, Any]] = {}  # param path -> (path in the tree, metadata)
    if prefixes:
        for prefix in reversed(prefixes):  # earlier prefixes win
            for key, leaf in saved.items():
                if key.startswith(prefix + "/"):
                    source[key[len(prefix) + 1:]] = (key, leaf)
    else:
        source = {key: (key, leaf) for key, leaf in saved.items()}

    rng = jax.random.key(exp.config.train.seed)
    abstract = abstract_params(exp.model_config, boxed=False)
    shardings = parallel.logical_shardings(tree_names(abstract, exp.names), abstract,
                                           exp.mesh, exp.rules)
    wanted = flatten(abstract)
    wanted_sh = flatten(shardings)
    report = InitReport(source=where)
    arch_errors = architecture_changes(source_config.get("model", {}), exp.model_config,
                                       exp.config.train.init_override, report, where)
    restore_target: dict[str, Any] = {}
    errors = []
    for key, leaf in wanted.items():
        if key not in source:
            report.new.append(f"{key} {tuple(leaf.shape)}")
            continue
        tree_key, meta = source[key]
        shape, saved_shape = tuple(leaf.shape), tuple(meta.shape)
        sharding = wanted_sh[key]
        if shape != saved_shape:
            if (is_position_table(key) and len(shape) == len(saved_shape) and
                    shape[1:] == saved_shape[1:] and saved_shape[0] >= shape[0]):
                report.resized.append(f"{key} {saved_shape} -> {shape}")
                sharding = parallel.replicated(exp.mesh)
            else:
                errors.append(f"leaf {key}: checkpoint shape {saved_shape} vs {shape} in this model")
                continue
        if np.dtype(meta.dtype) != np.dtype(leaf.dtype):
            report.cast.append(f"{key} {np.dtype(meta.dtype)} -> {np.dtype(leaf.dtype)}")
        report.loaded.append(key)
        restore_target[tree_key] = jax.ShapeDtypeStruct(saved_shape, meta.dtype, sharding=sharding)
    if errors:
        raise CheckpointError(f"init_from {where}: parameters do not fit this model:\n  " +
                              "\n  ".join(errors) + (f"\n  (architecture differences: "
                                                      f"{', '.join(arch_errors)})"
                                                      if arch_errors else ""))
    if arch_errors:
        names = [c.split()[0].split(".", 1)[1] for c in arch_errors]
        raise CheckpointError(
            f"init_from {where}: this model's architecture differs from the source's: "
            f"{', '.join(arch_errors)}; the weights would load into a model that computes "
            f"something else. Match these model fields to the source, or list the ones you "
            f"mean to change: train.init_override=[{','.join(names)}]")
    report.dropped = sorted(f"{k} {tuple(m.shape)}" for k, (_, m) in source.items()
                            if k not in wanted)
    if not report.loaded:
        raise CheckpointError(f"init_from {where}: no parameter path matches this model "
                              f"(source leaves: {few(sorted(source))})")

    flat_restored = flatten(restore_leaves(tree_dir, restore_target))
    loaded = {key: flat_restored[source[key][0]] for key in report.loaded}

    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        state = _init_with(exp, rng, loaded)
    return state, report


def _init_with(exp, rng, loaded: dict):
    """exp's sharded init with `loaded` leaves swapped in; the loaded arrays are arguments of
    the jitted function (not closed-over constants baked into the executable)."""
    def fn(r, arrays):
        def swap(params):
            def one(path, leaf):
                key = path_str(path)
                if key not in arrays:
                    return leaf
                value = arrays[key]
                if value.shape != leaf.shape:  # a longer position table, cut to max_len
                    value = value[tuple(slice(0, n) for n in leaf.shape)]
                return value.astype(leaf.dtype)
            return jax.tree_util.tree_map_with_path(one, params)
        return exp._init_fn(r, loaded=swap)

    state_sh = exp.state_shardings(exp.abstract_state())
    return jax.jit(fn, out_shardings=state_sh)(rng, loaded)
