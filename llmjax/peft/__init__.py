"""Parameter-efficient fine-tuning as parameter-tree transforms.

`build(peft_cfg)` returns a plan the trainer uses in four places:
`model_config(cfg)` turns on declared model hooks (soft prompts, prefixes,
adapters); `split(params, rng)` returns (trainable, frozen) trees (PEFT leaves
live in `trainable`); `merge(trainable, frozen)` rebuilds the parameters the
model applies, inside the jitted step; `axes(path, shape)` gives logical axis
names for PEFT leaves so they shard like their base weights.
"""
from __future__ import annotations

from llmjax.peft.config import PeftConfig

__all__ = ["FullPlan", "PeftConfig", "Plan", "build"]


def __getattr__(name):  # lazy: llmjax.config imports PeftConfig from this package
    if name in ("FullPlan", "Plan", "build"):
        from llmjax.peft import plan
        return getattr(plan, name)
    raise AttributeError(name)
