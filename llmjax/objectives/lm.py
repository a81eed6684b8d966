"""Decoder objectives: causal LM, prefix LM, and supervised fine-tuning (prompt masked)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError, ModelConfig
from llmjax.objectives.base import (Batch, Objective, Term, cross_entropy, next_token_weights,
                                    register, shift_left)


class _NextToken(Objective):
    architectures = ("decoder",)
    terms = ("lm",)

    def counts(self, batch: Batch) -> dict:
        return {"lm": jnp.sum(batch["lm_weights"])}

    def loss(self, outputs, batch) -> dict[str, Term]:
        return {"lm": cross_entropy(outputs["logits"], batch["lm_targets"], batch["lm_weights"],
                                    self.cfg.z_loss, self.cfg.label_smoothing)}

    def _targets(self, batch: Batch, weights) -> Batch:
        return {**batch, "lm_targets": shift_left(batch["tokens"]), "lm_weights": weights}


@register("clm")
class CausalLM(_NextToken):
    """Predict every next token within each packed document."""

    def prepare(self, batch: Batch, rng) -> Batch:
        return self._targets(batch, next_token_weights(batch["segment_ids"]))


@register("prefix_lm")
class PrefixLM(_NextToken):
    """A random prefix of each row's first document is seen bidirectionally and not predicted."""

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if model.attention_impl == "splash":
            raise ConfigError("objective 'prefix_lm' needs a per-example bidirectional prefix in "
                              "the attention mask, which the splash kernel cannot express: set "
                              "model.attention_impl=auto (XLA attention for this objective)")

    def prepare(self, batch: Batch, rng) -> Batch:
        seg = batch["segment_ids"]
        first = (seg == seg[:, :1]) & (seg != 0)
        doc_len = jnp.sum(first, axis=1)
        longest = jnp.maximum(jnp.floor(doc_len * self.cfg.prefix_fraction), 1).astype(jnp.int32)
        prefix_len = jax.random.randint(rng, doc_len.shape, 1, longest + 1)
        idx = jnp.arange(seg.shape[1])[None, :]
        prefix = first & (idx < prefix_len[:, None])
        # Predict token t+1 only when it lies outside the prefix.
        weights = next_token_weights(seg) * (1.0 - shift_left(prefix.astype(jnp.float32)))
        return {**self._targets(batch, weights), "prefix_mask": prefix}


@register("sft")
class SupervisedFineTuning(_NextToken):
    """Causal LM on prompt + response rows; loss only on response tokens (`loss_mask`)."""

    batch_kind = "sft"

    def prepare(self, batch: Batch, rng) -> Batch:
        weights = next_token_weights(batch["segment_ids"]) * shift_left(
            batch["loss_mask"]).astype(jnp.float32)
        return self._targets(batch, weights)
