"""Parameter-efficient fine-tuning as parameter-tree transforms.

`build(peft_cfg)` returns a plan the trainer uses in four places:
`model_config(cfg)` turns on declared model hooks (soft prompts, prefixes,
adapters); `split(params, rng)` returns (trainable, frozen) trees (PEFT leaves
live in `trainable`); `merge(trainable, frozen)` rebuilds the parameters the
model applies, inside the jitted step; `axes(path, shape)` gives logical axis
names for PEFT leaves so they shard like their base weights.

Methods (compose with '+'): full, freeze, ffn_only, bitfit, head, adapters,
prompt_tuning, prefix_tuning, lora, ia3. See docs/peft.md.
"""
from __future__ import annotations

from llmjax.peft.config import PeftConfig

__all__ = ["FullPlan", "PeftConfig", "Plan", "build", "summary", "save_adapter",
           "load_adapter", "apply_adapter", "merge_lora", "unmerge_lora", "METHODS"]

_LAZY = {
    "FullPlan": "plan", "Plan": "plan", "build": "plan", "METHODS": "plan",
    "ComposedPlan": "plan", "summary": "report", "save_adapter": "checkpoint",
    "load_adapter": "checkpoint", "apply_adapter": "checkpoint",
    "merge_checkpoint": "checkpoint", "merge_lora": "lora", "unmerge_lora": "lora",
}


def __getattr__(name):  # lazy: llmjax.config imports PeftConfig from this package
    if name in _LAZY:
        import importlib
        module = importlib.import_module(f"llmjax.peft.{_LAZY[name]}")
        if name == "METHODS":
            module._load_methods()
        return getattr(module, name)
    raise AttributeError(name)
