"""Sequence classification on the pooled output (BERT [CLS] pooler, or a decoder's last token)."""
from __future__ import annotations

import jax.numpy as jnp

from llmjax.config import ConfigError
from llmjax.objectives.base import Batch, Objective, Term, cross_entropy, register


@register("classification")
class Classification(Objective):
    architectures = ("encoder", "decoder")
    batch_kind = "classification"
    terms = ("classification",)

    def check(self, model) -> None:
        super().check(model)
        if model.num_labels < 2:
            raise ConfigError("objective classification needs model.num_labels >= 2")

    def prepare(self, batch: Batch, rng) -> Batch:
        return batch

    def counts(self, batch: Batch) -> dict:
        return {"classification": jnp.asarray(batch["labels"].shape[0], jnp.float32)}

    def loss(self, outputs, batch) -> dict[str, Term]:
        labels = batch["labels"]
        return {"classification": cross_entropy(outputs["class_logits"], labels,
                                                jnp.ones(labels.shape), 0.0,
                                                self.cfg.label_smoothing)}
