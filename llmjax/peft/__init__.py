"""Parameter-efficient fine-tuning as parameter-tree transforms.

`build(peft_cfg)` returns a plan the trainer uses in four places:
`model_config(cfg)` turns on declared model hooks (soft prompts, prefixes,
adapters); `split(params, rng)` returns (trainable, frozen) trees (PEFT leaves
live in `trainable`); `merge(trainable, frozen)` rebuilds the parameters the
model applies, inside the jitted step; `axes(path, shape)` gives logical axis
names for PEFT leaves so they shard like their base weights.

Methods (compose with '+'): full, freeze, ffn_only, bitfit, head, adapters,
prompt_tuning, prefix_tuning, lora, ia3. See docs/peft.md. The `peft:` config
section (PeftConfig) is defined in llmjax/config.py with the other sections.
"""
from __future__ import annotations

from llmjax.config import PeftConfig
from llmjax.peft.checkpoint import apply_adapter, load_adapter, merge_checkpoint, save_adapter
from llmjax.peft.lora import merge_lora, unmerge_lora
from llmjax.peft.methods import METHODS
from llmjax.peft.plan import ComposedPlan, FullPlan, Plan, build
from llmjax.peft.report import summary

__all__ = ["FullPlan", "PeftConfig", "Plan", "build", "summary", "save_adapter",
           "load_adapter", "apply_adapter", "merge_lora", "unmerge_lora", "METHODS",
           "ComposedPlan", "merge_checkpoint"]
