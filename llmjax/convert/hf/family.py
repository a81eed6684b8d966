"""What a Hugging Face family is (the Family hooks) and the table of registered families.

A family module (gpt2.py, bert.py, ...) subclasses Family and registers it with
`@register`; import and export (tensors.py, __init__.py) only call the hooks, so a new
family is one new module and one import line in __init__.py.
"""
from __future__ import annotations

import abc
from typing import Any

import numpy as np

from llmjax.config import ModelConfig
from llmjax.convert.hf.specs import Spec, require
from llmjax.errors import ConversionError


class Family(abc.ABC):
    """One HF family: its config.json mapping, its tensor table and its export rules."""

    name = ""  # the HF model_type it is registered under
    llmjax_family = ""  # the model.family of llmjax configs exported as this family
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    prefix = ""  # base-model prefix in task-head checkpoints (transformer., bert., model.)

    @abc.abstractmethod
    def to_config(self, hf: dict, tensors: dict) -> ModelConfig:
        """The llmjax model config of an HF config.json (and its tensors, for shapes)."""

    @abc.abstractmethod
    def specs(self, cfg: ModelConfig, prefix: str) -> list[Spec]:
        """How every llmjax leaf maps onto HF tensor names."""

    export_name = ""  # the HF family named in export errors
    export_requires: dict[str, Any] = {}  # ModelConfig field -> allowed value(s)

    def check_export(self, cfg: ModelConfig) -> None:
        for field in ("prompt_tokens", "prefix_tokens", "adapter_dim"):
            require(cfg, field, 0, "a Hugging Face model (merge or export the PEFT "
                    "parameters separately)")
        for field, allowed in self.export_requires.items():
            require(cfg, field, allowed, self.export_name)

    @abc.abstractmethod
    def hf_config(self, cfg: ModelConfig) -> dict:
        """config.json for an exported model."""

    def import_prefix(self, tensors: dict) -> str:
        """The base-model prefix the checkpoint's tensor names carry ("" for a bare base
        model saved without its task head)."""
        return self.prefix if any(k.startswith(self.prefix) for k in tensors) else ""

    def export_prefix(self, cfg: ModelConfig) -> str:
        return self.prefix

    def import_tensors(self, cfg: ModelConfig, tensors: dict) -> dict:
        """The checkpoint's tensors as the specs name them (a family may rename or stack
        alternative layouts, e.g. Mixtral's per-expert weights)."""
        return tensors

    def export_tensors(self, cfg: ModelConfig, tensors: dict[str, np.ndarray]
                       ) -> dict[str, np.ndarray]:
        """The tensors to write, from those the specs produced (a family may add copies)."""
        return tensors

    def ignorable(self, name: str, cfg: ModelConfig) -> bool:
        """HF tensors that carry no information beyond the ones the specs read."""
        return (name.endswith(("position_ids", "rotary_emb.inv_freq", ".attn.bias",
                               ".attn.masked_bias"))
                or (name == "lm_head.weight" and cfg.tie_embeddings))  # a saved tied copy


FAMILIES: dict[str, Family] = {}  # name -> the one instance, in registration order
LLMJAX_FAMILY: dict[str, str] = {}  # llmjax model.family -> FAMILIES key


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family available to import (by config.json) and export (by
    model.family)."""
    family = cls()
    FAMILIES[family.name] = family
    LLMJAX_FAMILY[family.llmjax_family] = family.name
    return cls


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES.values() for a in f.architectures]


def family_of_hf_config(hf: dict) -> Family:
    """The family of an HF config.json, from `architectures` (or `model_type`)."""
    archs = hf.get("architectures") or []
    for arch in archs:
        for family in FAMILIES.values():
            if arch in family.architectures:
                return family
    if archs:
        raise ConversionError(f"unknown architecture {archs[0]!r} in config.json; supported: "
                              f"{supported_architectures()}")
    model_type = hf.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ConversionError(f"unknown model_type {model_type!r} in config.json (and no "
                          f"'architectures'); supported: {supported_architectures()}")


def family_of_config(cfg: ModelConfig) -> Family:
    if cfg.family not in LLMJAX_FAMILY:
        raise ConversionError(f"model.family={cfg.family!r} has no Hugging Face export; "
                              f"supported: {sorted(LLMJAX_FAMILY)}")
    return FAMILIES[LLMJAX_FAMILY[cfg.family]]
