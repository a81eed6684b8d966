"""The plan interface the trainer speaks, and composition of methods with '+'.

Methods and their registry live in llmjax/peft/methods.py (one module per method family).
Trees are handled flat ({path tuple: leaf}) so methods compose by union and in order.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Optional, Protocol

import jax

from llmjax.config import ConfigError, ModelConfig
from llmjax.models.api import abstract_params
# The method modules register themselves in METHODS when imported.
from llmjax.peft import adapters, ia3, lora, masks, prompt, quantize  # noqa: F401
from llmjax.peft.config import PeftConfig
from llmjax.peft.methods import METHODS, Method, register  # noqa: F401 - re-exported
from llmjax.peft.reference import REFERENCE
from llmjax.tree import flatten_parts, logical_names, path_str, unflatten_parts

Params = dict


class Plan(Protocol):
    def model_config(self, cfg: ModelConfig) -> ModelConfig: ...
    def split(self, params: Params, rng: jax.Array) -> tuple[Params, Params]: ...
    def merge(self, trainable: Params, frozen: Params) -> Params: ...
    def axes(self, path: tuple, shape: tuple) -> Optional[tuple]: ...


class ComposedPlan:
    """One or more methods joined by '+': union of trainable sets, transforms in order."""

    def __init__(self, cfg: PeftConfig):
        check(cfg)
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
        if self.cfg.base_quantization:  # QLoRA: the frozen base stored block-quantized
            frozen = quantize.quantize_flat(frozen, self.cfg.base_quantization,
                                            self.cfg.quantization_block,
                                            self.cfg.double_quantization)
        return unflatten_parts(trainable), unflatten_parts(frozen)

    def merge(self, trainable: Params, frozen: Params) -> Params:
        """The parameters the model applies: base leaves (trainable win) + PEFT transforms.

        Also turns an adapter-only tree plus a full base tree into merged parameters.
        A dpo reference copy in `frozen` (peft/reference.py) is not part of the model.
        """
        frozen = {k: v for k, v in frozen.items() if k != REFERENCE}
        flat_t = flatten_parts(trainable)
        peft = {p: v for p, v in flat_t.items() if self.owns(p)}
        flat = dict(flatten_parts(frozen))
        if self.cfg.base_quantization:  # dequantized here, inside the jitted step
            flat = quantize.dequantize_flat(flat, self.cfg.base_quantization,
                                            self.cfg.quantization_block)
        flat.update({p: v for p, v in flat_t.items() if p not in peft})
        for method in self.methods:
            flat = method.apply(flat, peft)
        return unflatten_parts(flat)

    def axes(self, path: tuple, shape: tuple) -> Optional[tuple]:
        if path and path[-1] in quantize.LEAVES:
            return quantize.axes(path, shape, self.names())
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
        if not frozen or list(frozen) == [REFERENCE]:
            return trainable
        return super().merge(trainable, frozen)


def build(cfg: PeftConfig) -> Plan:
    """The plan for `peft.method` (validated: unknown names and bad values fail here)."""
    check(cfg)
    if cfg.methods() == ["full"] and not cfg.trainable:
        return FullPlan(cfg)
    return ComposedPlan(cfg)


def check(cfg: PeftConfig) -> None:
    """ConfigError for a bad peft section: its values (PeftConfig.validate) and its method
    names, checked against the registry here where plans are built."""
    cfg.validate()
    for name in cfg.methods():
        if name not in METHODS:
            close = difflib.get_close_matches(name, list(METHODS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"peft.method: unknown method {name!r}{hint}; "
                              f"available: {', '.join(sorted(METHODS))}")

