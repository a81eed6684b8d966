"""Methods that only choose which base leaves train: full, freeze, ffn_only, bitfit, head."""
from __future__ import annotations

import re

from llmjax.config import ConfigError, ModelConfig
from llmjax.peft.methods import Method, register

FFN = re.compile(r"(^|/)mlp/")  # the MLP's wi / wi_0 / wi_1 / wo kernels and biases
HEAD = re.compile(r"^(lm_head|heads)/")  # untied LM head, BERT MLM/NSP/pooler, classifier


@register("full")
class Full(Method):
    """Every parameter trains (strategy 1)."""

    def trains(self, path: str, cfg: ModelConfig) -> bool:
        return True


@register("freeze")
class Freeze(Method):
    """Everything trains except leaves matching peft.targets."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.targets:
            raise ConfigError("peft.method=freeze needs peft.targets: a regex of the leaves "
                              "to freeze, e.g. peft.targets='embed/|attention/'")
        self.frozen = re.compile(cfg.targets)

    def trains(self, path: str, cfg: ModelConfig) -> bool:
        return not self.frozen.search(path)


@register("ffn_only")
class FfnOnly(Method):
    """Only the feed-forward (MLP) weights train; attention, embeddings, norms frozen
    (strategy 2)."""

    def trains(self, path: str, cfg: ModelConfig) -> bool:
        return bool(FFN.search(path))


@register("bitfit")
class BitFit(Method):
    """Only bias terms train (dense, norm and head biases)."""

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        if not cfg.use_bias and not cfg.mlm_head:
            raise ConfigError(f"peft.method=bitfit: the {cfg.family} model has no biases "
                              f"(model.use_bias=false); choose lora or ia3 instead")
        return cfg

    def trains(self, path: str, cfg: ModelConfig) -> bool:
        leaf = path.rsplit("/", 1)[-1]
        return leaf == "bias" or leaf.endswith("_bias")


@register("head")
class Head(Method):
    """The output layers train: untied LM head and task heads (tied LM heads are the token
    embedding: add peft.trainable='embed/token' to train it)."""

    def trains(self, path: str, cfg: ModelConfig) -> bool:
        return bool(HEAD.search(path))
