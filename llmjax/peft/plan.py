"""The plan interface the trainer speaks, the method registry, and composition with '+'.

A method is a small object with (all optional):
  `model_config(cfg)`    turn on a declared model hook (soft prompt, prefixes, adapters);
  `trains(path, cfg)`    base leaves it makes trainable (path: '/'-joined string);
  `prepare(flat, rng)`   re-initialise leaves it owns (prompt from vocabulary rows);
  `init(flat, rng)`      new PEFT leaves {path tuple: array} (LoRA A/B, IA3 vectors);
  `owns(path)`           whether a trainable leaf is one of its PEFT leaves;
  `apply(flat, peft)`    the parameter-tree transform used inside the jitted step;
  `axes(path, shape, names)`  logical axis names of its PEFT leaves (they shard like the base).
Trees are handled flat ({path tuple: leaf}) so methods compose by union and in order.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Protocol

import jax

from llmjax.config import ConfigError, ModelConfig
from llmjax.peft.config import PeftConfig
from llmjax.tree import flatten_parts, path_str, unflatten_parts

Params = dict
METHODS: dict[str, Callable[[PeftConfig], "Method"]] = {}


def register(name: str):
    """Class decorator: make a method available as `peft.method=name`."""
    def add(cls):
        METHODS[name] = cls
        cls.name = name
        return cls
    return add


class Plan(Protocol):
    def model_config(self, cfg: ModelConfig) -> ModelConfig: ...
    def split(self, params: Params, rng: jax.Array) -> tuple[Params, Params]: ...
    def merge(self, trainable: Params, frozen: Params) -> Params: ...
    def axes(self, path: tuple, shape: tuple) -> Optional[tuple]: ...


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


class ComposedPlan:
    """One or more methods joined by '+': union of trainable sets, transforms in order."""

    def __init__(self, cfg: PeftConfig):
        cfg.validate()
        self.cfg = cfg
        self.methods: list[Method] = [METHODS[name](cfg) for name in cfg.methods()]
        self.extra = re.compile(cfg.trainable) if cfg.trainable else None
        self._model_cfg: Optional[ModelConfig] = None
        self._names: Optional[dict] = None

    # -- the Plan protocol ---------------------------------------------------------------
    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """The model config with the methods' hooks turned on (remembered for `axes`)."""
        for method in self.methods:
            cfg = method.model_config(cfg)
        self._model_cfg, self._names = cfg, None
        return cfg

    def split(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        """(trainable, frozen): PEFT leaves are created here and live in `trainable`."""
        cfg = self._model_cfg
        flat = flatten_parts(params)
        rngs = jax.random.split(rng, 2 * len(self.methods))
        for i, method in enumerate(self.methods):
            flat = method.prepare(flat, rngs[2 * i])
        peft = {}
        for i, method in enumerate(self.methods):
            peft.update(method.init(flat, rngs[2 * i + 1]))
        trainable = {p: v for p, v in flat.items() if self.is_trainable(p, cfg)}
        frozen = {p: v for p, v in flat.items() if p not in trainable}
        for path in peft:
            for n in range(1, len(path)):
                if path[:n] in trainable:
                    raise ConfigError(
                        f"peft.method={self.cfg.method!r}: {path_str(path[:n])} is both trained "
                        f"and adapted by {path_str(path[n:])}; drop it from peft.trainable or "
                        f"from peft.targets")
        if not trainable and not peft:
            raise ConfigError(f"peft.method={self.cfg.method!r} leaves nothing to train in this "
                              f"model; check peft.targets / peft.trainable")
        trainable.update(peft)
        return unflatten_parts(trainable), unflatten_parts(frozen)

    def merge(self, trainable: Params, frozen: Params) -> Params:
        """The parameters the model applies: base leaves (trainable win) + PEFT transforms.

        Also turns an adapter-only tree plus a full base tree into merged parameters.
        """
        flat_t = flatten_parts(trainable)
        peft = {p: v for p, v in flat_t.items() if self.owns(p)}
        flat = dict(flatten_parts(frozen))
        flat.update({p: v for p, v in flat_t.items() if p not in peft})
        for method in self.methods:
            flat = method.apply(flat, peft)
        return unflatten_parts(flat)

    def axes(self, path: tuple, shape: tuple) -> Optional[tuple]:
        for method in self.methods:
            if method.owns(path):
                return method.axes(path, shape, self.names())
        return None

    # -- helpers -------------------------------------------------------------------------
    def is_trainable(self, path: tuple, cfg: Optional[ModelConfig] = None) -> bool:
        """Whether a base leaf trains (some method trains it, or peft.trainable matches)."""
        text = path_str(path)
        if self.extra is not None and self.extra.search(text):
            return True
        return any(m.trains(text, cfg or self._model_cfg) for m in self.methods)

    def owns(self, path: tuple) -> bool:
        return any(m.owns(path) for m in self.methods)

    def names(self) -> dict:
        """{param path: logical names} of the hooked model (for PEFT leaves' axes)."""
        if self._names is None:
            if self._model_cfg is None:
                return {}
            from llmjax.models.api import abstract_params
            from llmjax.tree import logical_names
            self._names = logical_names(abstract_params(self._model_cfg))
        return self._names

    def describe(self) -> str:
        return "+".join(m.name for m in self.methods)


class FullPlan(ComposedPlan):
    """Every parameter trains (the seed's strategy 1)."""

    def __init__(self, cfg: Optional[PeftConfig] = None):
        cfg = dataclasses.replace(cfg or PeftConfig(), method="full")
        super().__init__(cfg)

    def split(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        return params, {}

    def merge(self, trainable: Params, frozen: Params) -> Params:
        if not frozen:
            return trainable
        return super().merge(trainable, frozen)


def build(cfg: PeftConfig) -> Plan:
    """The plan for `peft.method` (validated: unknown names and bad values fail here)."""
    _load_methods()
    try:
        cfg.validate()
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.methods() == ["full"] and not cfg.trainable:
        return FullPlan(cfg)
    return ComposedPlan(cfg)


def _load_methods() -> None:
    """Import the method modules; each registers its methods in METHODS."""
    from llmjax.peft import adapters, ia3, lora, masks, prompt  # noqa: F401

