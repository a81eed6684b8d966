"""Prompt tuning (learned virtual input tokens) and prefix tuning (per-layer key/value
prefixes). Both use declared model hooks (`model.prompt_tokens`, `model.prefix_tokens`):
the model prepends the soft prompt with segment -1, visible to every token, and
strips it from the outputs, so output shapes do not change.
"""
from __future__ import annotations

import dataclasses

import jax

from llmjax.config import ModelConfig
from llmjax.peft.methods import Method, register

PROMPT = ("prompt",)
TOKEN_EMBEDDING = ("embed", "token", "embedding")


@register("prompt_tuning")
class PromptTuning(Method):
    """n virtual tokens, initialised from random rows of the vocabulary embedding (or random)."""

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        return dataclasses.replace(cfg, prompt_tokens=self.cfg.num_virtual_tokens)

    def trains(self, path: str, cfg: ModelConfig) -> bool:
        return path == "prompt"

    def prepare(self, flat: dict, rng: jax.Array) -> dict:
        if self.cfg.prompt_init != "vocab" or TOKEN_EMBEDDING not in flat:
            return flat  # 'random': the model's normal(initializer_range) init
        table = flat[TOKEN_EMBEDDING]
        prompt = flat[PROMPT]
        ids = jax.random.randint(rng, (prompt.shape[0],), 0, table.shape[0])
        return {**flat, PROMPT: table[ids].astype(prompt.dtype)}


@register("prefix_tuning")
class PrefixTuning(Method):
    """n learned keys and values per attention layer (self- and cross-attention)."""

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        return dataclasses.replace(cfg, prefix_tokens=self.cfg.num_virtual_tokens)

    def trains(self, path: str, cfg: ModelConfig) -> bool:
        leaf = path.rsplit("/", 1)[-1]
        return leaf in ("prefix_key", "prefix_value")
