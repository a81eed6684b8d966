"""Adapter-only checkpoints (the trainable tree: small) on top of a base checkpoint, and
merged full exports. Built on llmjax.checkpoint.save_params / load_params (orbax)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

from llmjax.config import ConfigError, ModelConfig
from llmjax.peft.config import PeftConfig

KIND = "peft_adapter"


def save_adapter(directory: str | os.PathLike, trainable: Any, peft_cfg: PeftConfig,
                 model_cfg: Optional[ModelConfig] = None, base: str = "") -> Path:
    """Write the trainable subtree (LoRA A/B, IA3 vectors, prompts, adapters, heads) with
    the peft section, the hooked model section and the base checkpoint's path."""
    from llmjax.checkpoint import save_params
    config = {"kind": KIND, "peft": dataclasses.asdict(peft_cfg), "base": str(base or "")}
    if model_cfg is not None:
        config["model"] = dataclasses.asdict(model_cfg)
    return save_params(directory, trainable, config)


def load_adapter(directory: str | os.PathLike, target: Any = None
                 ) -> tuple[Any, PeftConfig, dict]:
    """(trainable tree, PeftConfig, stored config dict) of an adapter checkpoint."""
    from llmjax.checkpoint import load_params
    from llmjax.config import _build
    tree, config = load_params(directory, target)
    if config.get("kind") != KIND:
        raise ConfigError(f"{str(directory)!r} is not an adapter checkpoint (no "
                          f"'kind: {KIND}' in its config.yaml)")
    return tree, _build(PeftConfig, config.get("peft", {}), "peft"), config


def apply_adapter(base_params: Any, adapter: Any, peft_cfg: PeftConfig) -> dict:
    """Full parameters with the adapter applied: LoRA folded into W, IA3 into the kernels,
    prompts / prefixes / adapter layers / trained heads taken from the adapter."""
    from llmjax.peft.plan import build
    return build(peft_cfg).merge(adapter, base_params)


def merge_checkpoint(adapter_dir: str | os.PathLike, out: str | os.PathLike,
                     base_dir: Optional[str | os.PathLike] = None) -> Path:
    """`llmjax peft merge`: base checkpoint + adapter checkpoint -> merged parameter export."""
    from llmjax.checkpoint import load_params, save_params
    from llmjax.config import _build
    from llmjax.peft.plan import build
    adapter, peft_cfg, config = load_adapter(adapter_dir)
    base_dir = base_dir or config.get("base")
    if not base_dir:
        raise ConfigError(f"{str(adapter_dir)!r} does not record its base checkpoint: "
                          f"pass --base DIR")
    base_params, base_config = load_params(base_dir)
    plan = build(peft_cfg)
    model_cfg = plan.model_config(_build(ModelConfig, base_config.get("model", {}), "model"))
    merged = plan.merge(adapter, base_params)
    return save_params(out, merged, model_cfg,
                       extra={"merged_from": {"base": str(base_dir), "adapter": str(adapter_dir),
                                              "peft": dataclasses.asdict(peft_cfg)}})
