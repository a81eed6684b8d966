"""Masked language modelling (BERT): 15% of tokens, 80% [MASK] / 10% random / 10% kept."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError
from llmjax.objectives.base import Batch, Objective, Term, cross_entropy, register


@register("mlm")
class MaskedLM(Objective):
    architectures = ("encoder",)
    order = 20  # after row builders such as nsp
    terms = ("mlm",)

    def check(self, model) -> None:
        super().check(model)
        if not model.mlm_head:
            raise ConfigError("objective mlm needs model.mlm_head=true")

    def prepare(self, batch: Batch, rng) -> Batch:
        tokens = batch["tokens"]
        first = self.special.num_special
        candidates = (tokens >= first) & (batch["segment_ids"] != 0)
        k_choose, k_kind, k_random = jax.random.split(rng, 3)
        chosen = candidates & jax.random.bernoulli(k_choose, self.cfg.mask_rate, tokens.shape)
        u = jax.random.uniform(k_kind, tokens.shape)
        to_mask = chosen & (u < self.cfg.mask_token_rate)
        to_random = chosen & (u >= self.cfg.mask_token_rate) & (
            u < self.cfg.mask_token_rate + self.cfg.random_token_rate)
        random_ids = jax.random.randint(k_random, tokens.shape, first, self.model.vocab_size)
        inputs = jnp.where(to_mask, self.special.mask, jnp.where(to_random, random_ids, tokens))
        return {**batch, "tokens": inputs.astype(tokens.dtype), "mlm_targets": tokens,
                "mlm_weights": chosen.astype(jnp.float32)}

    def counts(self, batch: Batch) -> dict:
        return {"mlm": jnp.sum(batch["mlm_weights"])}

    def loss(self, outputs, batch) -> dict[str, Term]:
        return {"mlm": cross_entropy(outputs["logits"], batch["mlm_targets"], batch["mlm_weights"],
                                     self.cfg.z_loss, self.cfg.label_smoothing)}
