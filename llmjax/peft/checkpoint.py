"""Adapter-only checkpoints (the trainable tree: small) on top of a base checkpoint, and
merged full exports. Built on llmjax.checkpoint's parameter exports (orbax)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np
from etils import epath

from llmjax import paths
from llmjax.checkpoint.location import PathLike
from llmjax.checkpoint.params import load_params, save_params, write_params_export
from llmjax.checkpoint.trees import is_position_table
from llmjax.config import ConfigError, ModelConfig, PeftConfig, section_from_dict
from llmjax.errors import CheckpointError
from llmjax.models.api import abstract_params
from llmjax.peft import base_ref
from llmjax.peft.base_ref import BaseRef
from llmjax.peft.plan import build
from llmjax.tree import flatten, unflatten

KIND = "peft_adapter"


def save_adapter(directory: PathLike, trainable: Any, peft_cfg: PeftConfig,
                 model_cfg: Optional[ModelConfig] = None, base: Any = "",
                 frozen: Any = None, force: bool = False) -> epath.Path:
    """Write the trainable subtree (LoRA A/B, IA3 vectors, prompts, adapters, heads) with
    the peft section, the hooked model section and the base checkpoint's path.

    `base` is a path, or a BaseRef (llmjax/peft/base_ref.py): then its fingerprint is kept
    (merge checks it) and the `frozen` leaves that are not from the base (a new head left
    frozen) are stored too, so adapter + base is the whole model."""
    config = {"kind": KIND, "peft": dataclasses.asdict(peft_cfg)}
    tree = trainable
    if isinstance(base, BaseRef):
        config["base"] = base.path
        config["base_ref"] = base.to_dict()
        if frozen is not None:
            tree = unflatten({**flatten(base.stored(frozen)), **flatten(trainable)})
    else:
        config["base"] = str(base or "")
    if model_cfg is not None:
        config["model"] = dataclasses.asdict(model_cfg)
    return save_params(directory, tree, config, force=force)


def load_adapter(directory: PathLike, target: Any = None
                 ) -> tuple[Any, PeftConfig, dict]:
    """(trainable tree, PeftConfig, stored config dict) of an adapter checkpoint."""
    tree, config = load_params(directory, target)
    if config.get("kind") != KIND:
        raise ConfigError(f"{str(directory)!r} is not an adapter checkpoint (no "
                          f"'kind: {KIND}' in its config.yaml)")
    return tree, section_from_dict(PeftConfig, config.get("peft", {}), "peft"), config


def apply_adapter(base_params: Any, adapter: Any, peft_cfg: PeftConfig) -> dict:
    """Full parameters with the adapter applied: LoRA folded into W, IA3 into the kernels,
    prompts / prefixes / adapter layers / trained heads taken from the adapter."""
    return build(peft_cfg).merge(adapter, base_params)


def merge_checkpoint(adapter_dir: PathLike, out: PathLike,
                     base_dir: Optional[PathLike] = None, force: bool = False) -> epath.Path:
    """`llmjax peft merge`: base + adapter checkpoint -> merged parameter export.

    The base is anything init_from accepts (run dir, checkpoint step dir, parameter export),
    read by llmjax.loader.load_model; an adapter written by a run checks the base's
    fingerprint, so merging onto another base fails instead of exporting other weights."""
    from llmjax.loader import load_model  # same layer; imports llmjax.peft (a module cycle)
    adapter, peft_cfg, config = load_adapter(adapter_dir)
    base_dir = base_dir or config.get("base")
    if not base_dir:
        raise ConfigError(f"{str(adapter_dir)!r} does not record its base checkpoint: "
                          f"pass --base DIR")
    if not paths.absolute(base_dir, "--base").exists():
        raise CheckpointError(f"base {base_dir} of adapter {adapter_dir} does not exist: pass "
                              f"--base DIR where that base now lives")
    base = load_model(base_dir)
    plan = build(peft_cfg)
    if config.get("model"):
        model_cfg = section_from_dict(ModelConfig, config["model"], "model")
        plan.model_config(model_cfg)  # the plan remembers the model for its leaves' axes
    else:
        model_cfg = plan.model_config(base.model)
    ref = BaseRef.from_dict(config.get("base_ref"))
    params = fit_base(base.params, model_cfg, adapter, ref, where=f"base {base_dir}")
    merged = plan.merge(adapter, params)
    return write_params_export(out, merged, model_cfg, base.tokenizer, force=force,
                               extra={"merged_from": {"base": str(base_dir),
                                                      "adapter": str(adapter_dir),
                                                      "peft": dataclasses.asdict(peft_cfg)}})


def fit_base(base_params: Any, model_cfg: ModelConfig, adapter: Any, ref: Any,
             where: str) -> dict:
    """Base leaves shaped as the fine-tuned model has them (as init_from loads them: learned
    position tables cut to max_len, dtypes cast); leaves the adapter holds win. With a
    BaseRef, the fingerprint of the leaves the run took from its base must match."""
    base = flatten(base_params)
    have = set(flatten(adapter))
    out, missing = {}, []
    for key, leaf in flatten(abstract_params(model_cfg, boxed=False)).items():
        if key in have:
            continue
        if key not in base:
            missing.append(key)
            continue
        value = base[key]
        if tuple(value.shape) != tuple(leaf.shape):
            if not (is_position_table(key) and value.shape[1:] == leaf.shape[1:]
                    and value.shape[0] >= leaf.shape[0]):
                raise CheckpointError(f"{where}: leaf {key} has shape {tuple(value.shape)}, the "
                                      f"adapter's model has {tuple(leaf.shape)}")
            value = value[:leaf.shape[0]]
        out[key] = value if np.dtype(value.dtype) == np.dtype(leaf.dtype) else \
            jax.numpy.asarray(value).astype(leaf.dtype)
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} leaves of the adapter's model "
                              f"({', '.join(missing[:4])}): is it the base the adapter was "
                              f"trained on?")
    if ref is not None:
        got = base_ref.fingerprint({k: out[k] for k in ref.leaves if k in out})
        if got != ref.fingerprint:
            raise CheckpointError(f"{where} is not the base the adapter was trained on "
                                  f"({ref.path}, fingerprint {ref.fingerprint[:12]}; this one "
                                  f"{got[:12]}): pass --base with that base")
    return unflatten(out)
