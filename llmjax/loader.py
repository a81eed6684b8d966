"""One loader for the models llmjax writes: `load_model(path) -> LoadedModel(model config,
params, tokenizer directory, config)` for a run directory (its latest checkpoint), a
checkpoint step directory or a parameter export. It serves `llmjax.from_pretrained` (and so
`llmjax convert` and generation), `llmjax export`, `peft merge --base` and train.init_from's
PEFT bases.

A run's parameters come back as the model applies them: params and frozen leaves only (no
optimizer state), its PEFT plan merged (LoRA, IA3, prompts, ...), the frozen base leaves a
PEFT checkpoint references read from that base (fingerprint-checked).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from etils import epath

from llmjax import paths
from llmjax.checkpoint.location import CHECKPOINT_DIR, PathLike, read_step_meta, resolve_source
from llmjax.checkpoint.params import TOKENIZER_SUBDIR, load_params
from llmjax.checkpoint.trees import restore_leaves, tree_metadata
from llmjax.config import ModelConfig, section_from_dict
from llmjax.errors import CheckpointError
from llmjax.peft import base_ref
from llmjax.peft.config import PeftConfig
from llmjax.peft.plan import build as build_plan


@dataclasses.dataclass
class LoadedModel:
    """A model read from anything init_from accepts, as the model applies it."""

    model: ModelConfig  # with the source run's PEFT hooks on (prompt, prefix, adapters)
    params: Any  # on the default device, PEFT deltas merged
    tokenizer: Optional[epath.Path]  # the directory holding its tokenizer, if known
    config: dict  # the run config, or the export's config.yaml
    source: epath.Path  # the step directory or export read


def is_run(path: PathLike) -> bool:
    """A run directory (checkpoints/) or a checkpoint step directory (state/)."""
    path = paths.absolute(path)
    return (path / CHECKPOINT_DIR).is_dir() or (path / "state").is_dir()


def load_model(path: PathLike) -> LoadedModel:
    """The model config, parameters (default device) and tokenizer directory of a run
    directory (latest checkpoint), a checkpoint step directory or a parameter export."""
    path = paths.absolute(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if is_run(path):
        model_cfg, trainable, frozen, config, step_dir = _run_trees(path, with_base=True)
        plan = build_plan(section_from_dict(PeftConfig, config.get("peft", {}), "peft"))
        params = plan.merge(trainable, frozen)
        return LoadedModel(model_cfg, params, _run_tokenizer(step_dir, config), config,
                           step_dir)
    tree_dir, _, config = resolve_source(path)
    if config.get("kind"):  # e.g. peft_adapter: trainable leaves only, not a whole model
        raise CheckpointError(f"{path} is a {config['kind']} export, not a model: merge it "
                              f"onto its base first (llmjax peft merge {path} OUT)")
    params, config = load_params(tree_dir.parent)
    model_cfg = section_from_dict(ModelConfig, dict(config.get("model", config)), "model")
    tok = tree_dir.parent / TOKENIZER_SUBDIR
    return LoadedModel(model_cfg, params, tok if tok.is_dir() else None, config,
                       tree_dir.parent)


def load_run_trees(path: PathLike, with_base: bool = True
                   ) -> tuple[ModelConfig, Any, Any, dict]:
    """(hooked model config, trainable tree, frozen tree, run config) of a run directory
    (latest checkpoint) or a checkpoint step directory, on the default device; the frozen
    base leaves a PEFT checkpoint references are read from its base (fingerprint-checked)
    unless with_base=False (then frozen holds only the leaves the checkpoint stores)."""
    return _run_trees(paths.absolute(path), with_base)[:4]


def _run_trees(path: epath.Path, with_base: bool):
    tree_dir, prefixes, config = resolve_source(path, allow_base_ref=True)
    if not prefixes:
        raise CheckpointError(f"{path} is a parameter export, not a run: use load_params")
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {key: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=single)
              for key, m in tree_metadata(tree_dir).items() if key.split("/")[0] in prefixes}
    restored = restore_leaves(tree_dir, target)
    plan = build_plan(section_from_dict(PeftConfig, config.get("peft", {}), "peft"))
    model_cfg = plan.model_config(section_from_dict(ModelConfig, config.get("model", {}),
                                                    "model"))
    trainable, frozen = restored.get("params", {}), restored.get("frozen", {})
    ref = base_ref.read_ref(tree_dir.parent)
    if ref is not None and with_base:
        frozen = base_ref.restore_frozen_single(ref, model_cfg, frozen, str(tree_dir.parent),
                                                config.get("train", {}).get("init_from", ""))
    return model_cfg, trainable, frozen, config, tree_dir.parent


def _run_tokenizer(step_dir: epath.Path, config: dict) -> Optional[epath.Path]:
    """The run's tokenizer directory: as recorded when it saved (absolute), else as its config
    names it (returned even when missing, for the caller's error to name it)."""
    recorded = (read_step_meta(step_dir).get("tokenizer") or {}).get("path")
    candidates = [c for c in (recorded, config.get("data", {}).get("tokenizer")) if c]
    for candidate in candidates:
        if paths.absolute(candidate, "tokenizer").is_dir():
            return paths.absolute(candidate, "tokenizer")
    return paths.absolute(candidates[-1], "tokenizer") if candidates else None
