"""Sequence classification on the pooled output (BERT [CLS] pooler, or a decoder's last token).

Batches hold labels [B] (one example per row) or, packed, labels [B, S]: the label of
segment k+1 of each row at k and -1 in unused slots. For packed rows `prepare` finds each
segment's [CLS] (encoders) or last token (decoders) on device from the segment ids; the
segments attend only to themselves, so a packed example scores as it would alone.
"""
from __future__ import annotations

import jax.numpy as jnp

from llmjax.config import ConfigError
from llmjax.models.heads import pool_positions
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
        if batch["labels"].ndim == 2:
            first = self.model.architecture == "encoder"
            batch = {**batch, "pool_index": pool_positions(batch["segment_ids"],
                                                           batch["labels"].shape[1], first)}
        return batch

    def counts(self, batch: Batch) -> dict:
        return {"classification": jnp.sum(batch["labels"] >= 0).astype(jnp.float32)}

    def loss(self, outputs, batch) -> dict[str, Term]:
        labels = batch["labels"]
        return {"classification": cross_entropy(outputs["class_logits"], jnp.maximum(labels, 0),
                                                (labels >= 0).astype(jnp.float32), 0.0,
                                                self.cfg.label_smoothing)}
