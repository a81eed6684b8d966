"""The plan interface the trainer speaks, and full fine-tuning."""
from __future__ import annotations

from typing import Optional, Protocol

import jax

from llmjax.config import ConfigError, ModelConfig
from llmjax.peft.config import PeftConfig

Params = dict


class Plan(Protocol):
    def model_config(self, cfg: ModelConfig) -> ModelConfig: ...
    def split(self, params: Params, rng: jax.Array) -> tuple[Params, Params]: ...
    def merge(self, trainable: Params, frozen: Params) -> Params: ...
    def axes(self, path: tuple, shape: tuple) -> Optional[tuple]: ...


class FullPlan:
    """Every parameter trains (the seed's strategy 1)."""

    def __init__(self, cfg: Optional[PeftConfig] = None):
        self.cfg = cfg or PeftConfig()

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        return cfg

    def split(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        return params, {}

    def merge(self, trainable: Params, frozen: Params) -> Params:
        return trainable

    def axes(self, path: tuple, shape: tuple) -> Optional[tuple]:
        return None


def build(cfg: PeftConfig) -> Plan:
    """The plan for `peft.method`."""
    if cfg.method == "full":
        return FullPlan(cfg)
    raise ConfigError(f"peft.method={cfg.method!r} is not available; use 'full'")
