"""Next-sentence prediction (BERT): half the pairs get a random second segment.

The pipeline supplies true consecutive pairs (`tokens_a`, `tokens_b`); this
objective swaps half of the second segments with another row's, in the step,
and assembles [CLS] A [SEP] B [SEP] with token types. Label 0 = IsNext.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError
from llmjax.objectives.base import Batch, Objective, Term, cross_entropy, register


def assemble_pair(a, b, cls_id: int, sep_id: int):
    """[CLS] a [SEP] b [SEP] right-padded with 0: (tokens, token_types, segment_ids)."""
    batch, la = a.shape
    lb = b.shape[1]
    length = la + lb + 3
    len_a = jnp.sum(a != 0, axis=1)
    len_b = jnp.sum(b != 0, axis=1)
    rows = jnp.arange(batch)[:, None]
    tokens = jnp.zeros((batch, length), a.dtype).at[:, 0].set(cls_id)
    idx_a = jnp.where(jnp.arange(la)[None] < len_a[:, None], 1 + jnp.arange(la)[None], length)
    tokens = tokens.at[rows, idx_a].set(a, mode="drop")
    tokens = tokens.at[jnp.arange(batch), len_a + 1].set(sep_id)
    start_b = len_a + 2
    idx_b = jnp.where(jnp.arange(lb)[None] < len_b[:, None], start_b[:, None] + jnp.arange(lb)[None],
                      length)
    tokens = tokens.at[rows, idx_b].set(b, mode="drop")
    end = start_b + len_b
    tokens = tokens.at[jnp.arange(batch), end].set(sep_id)
    idx = jnp.arange(length)[None]
    token_types = ((idx >= start_b[:, None]) & (idx <= end[:, None])).astype(jnp.int32)
    segment_ids = (idx <= end[:, None]).astype(jnp.int32)
    return tokens, token_types, segment_ids


@register("nsp")
class NextSentence(Objective):
    architectures = ("encoder",)
    batch_kind = "nsp"
    order = 0  # builds the rows other objectives (mlm) then mask
    terms = ("nsp",)

    def check(self, model) -> None:
        super().check(model)
        if not (model.nsp_head and model.num_token_types >= 2):
            raise ConfigError("objective nsp needs model.nsp_head=true and model.num_token_types>=2")

    def prepare(self, batch: Batch, rng) -> Batch:
        a, b = batch["tokens_a"], batch["tokens_b"]
        not_next = jax.random.bernoulli(rng, 0.5, (a.shape[0],))
        shift = max(a.shape[0] // 2, 1)  # another row's second segment
        b = jnp.where(not_next[:, None], jnp.roll(b, shift, axis=0), b)
        tokens, token_types, segment_ids = assemble_pair(a, b, self.special.cls, self.special.sep)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape).astype(jnp.int32)
        return {**batch, "tokens": tokens, "token_types": token_types, "segment_ids": segment_ids,
                "positions": positions, "nsp_labels": not_next.astype(jnp.int32)}

    def counts(self, batch: Batch) -> dict:
        return {"nsp": jnp.asarray(batch["nsp_labels"].shape[0], jnp.float32)}

    def loss(self, outputs, batch) -> dict[str, Term]:
        labels = batch["nsp_labels"]
        return {"nsp": cross_entropy(outputs["nsp_logits"], labels, jnp.ones(labels.shape))}
