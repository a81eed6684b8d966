"""MoE router loss terms added to any objective of a mixture-of-experts model.

The MoE layers sow their router statistics (llmjax/models/moe.py); the train step's forward
collects them into outputs["router"]. This wrapper adds two weighted terms to the wrapped
objective's: `router_balance` (Switch load-balancing loss, weight
model.router_balance_weight) and `router_z` (router z-loss, model.router_z_weight). Each is
the batch's per-layer mean times its token count over the global token count, so
accumulated micro-batches give the token-weighted mean over micro-batches.
"""
from __future__ import annotations

import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.objectives.base import Batch, Objective, Term

TERMS = {"router_balance": "balance", "router_z": "z"}


def _tokens(batch: Batch):
    seg = batch.get("segment_ids", batch["tokens"])
    return jnp.sum(seg != 0).astype(jnp.float32)


class WithRouterLoss(Objective):
    """`inner` plus the router terms; every other attribute is the inner objective's."""

    def __init__(self, inner: Objective, model: ModelConfig):  # inner.__init__ checked the model
        self.inner, self.model = inner, model
        self.terms = tuple(inner.terms) + tuple(TERMS)
        self.term_weights = {**inner.term_weights, "router_balance": model.router_balance_weight,
                             "router_z": model.router_z_weight}

    def __getattr__(self, name):  # name, batch_kind, architectures, parts, cfg, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def prepare(self, batch: Batch, rng) -> Batch:
        return self.inner.prepare(batch, rng)

    def counts(self, batch: Batch) -> dict:
        n = _tokens(batch)
        return {**self.inner.counts(batch), **{name: n for name in TERMS}}

    def loss(self, outputs: dict, batch: Batch) -> dict[str, Term]:
        terms = dict(self.inner.loss(outputs, batch))
        stats = outputs.get("router")
        if stats:  # absent when the forward did not collect them (generation, export)
            n = _tokens(batch)
            zero = jnp.zeros((), jnp.float32)
            for name, key in TERMS.items():
                terms[name] = Term(stats[key] * n, n, zero)
        return terms
