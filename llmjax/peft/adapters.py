"""Houlsby adapters (strategy 3): bottleneck FFNs after attention and MLP, trained with
the norms and the output layer/heads; everything else frozen.

The math needs activations, so this uses the model's declared hook
(`model.adapter_dim`, llmjax.models.layers.Adapter: x + up(gelu(down x)) with
`up` zero-initialised, so the model starts unchanged).
"""
from __future__ import annotations

import dataclasses
import re

from llmjax.config import ModelConfig
from llmjax.peft.masks import HEAD
from llmjax.peft.methods import Method, register

ADAPTER = re.compile(r"(^|/)\w+_adapter/")
NORM = re.compile(r"(^|/)\w*norm/")


@register("adapters")
class Adapters(Method):
    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        return dataclasses.replace(cfg, adapter_dim=self.cfg.adapter_dim)

    def trains(self, path: str, cfg: ModelConfig) -> bool:
        return bool(ADAPTER.search(path) or NORM.search(path) or HEAD.search(path))
