"""The PEFT method registry and the Method base class.

A method is a small object with (all optional):
  `model_config(cfg)`    turn on a declared model hook (soft prompt, prefixes, adapters);
  `trains(path, cfg)`    base leaves it makes trainable (path: '/'-joined string);
  `prepare(flat, rng)`   re-initialise leaves it owns (prompt from vocabulary rows);
  `init(flat, rng)`      new PEFT leaves {path tuple: array} (LoRA A/B, IA3 vectors);
  `owns(path)`           whether a trainable leaf is one of its PEFT leaves;
  `apply(flat, peft)`    the parameter-tree transform used inside the jitted step;
  `axes(path, shape, names)`  logical axis names of its PEFT leaves (they shard like the base).

Each method module (masks, lora, ia3, prompt, adapters) imports this one and registers its
classes with `@register(name)`; llmjax.peft.plan imports them all, so the registry is full
wherever a plan can be built. A new method: a module here plus one import line in plan.py.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax

from llmjax.config import ModelConfig
from llmjax.peft.config import PeftConfig

Params = dict
METHODS: dict[str, Callable[[PeftConfig], "Method"]] = {}


def register(name: str):
    """Class decorator: make a method available as `peft.method=name`."""
    def add(cls):
        METHODS[name] = cls
        cls.name = name
        return cls
    return add


class Method:
    """Base: trains nothing, adds nothing, changes nothing."""

    name = "?"

    def __init__(self, cfg: PeftConfig):
        self.cfg = cfg

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        return cfg

    def trains(self, path: str, cfg: ModelConfig) -> bool:
        return False

    def prepare(self, flat: dict, rng: jax.Array) -> dict:
        return flat

    def init(self, flat: dict, rng: jax.Array) -> dict:
        return {}

    def owns(self, path: tuple) -> bool:
        return False

    def apply(self, flat: dict, peft: dict) -> dict:
        return flat

    def axes(self, path: tuple, shape: tuple, names: dict) -> Optional[tuple]:
        return None
