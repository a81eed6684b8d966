"""Task heads on top of the final hidden states: BERT MLM and NSP, pooler, classifier."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models.layers import ACTIVATIONS, Dense, constrain, make_norm, param

Array = jax.Array


def last_token(hidden: Array, segments: Array) -> Array:
    """Hidden state of the last token of the first document in each row (decoder pooling)."""
    length = jnp.sum(segments == segments[:, :1], axis=1)
    idx = jnp.maximum(length - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


class Heads(nn.Module):
    """Whichever heads the config asks for; returns a dict of their outputs."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden: Array, segments: Array, embedder, deterministic: bool = True):
        cfg = self.cfg
        dense = lambda n, axes, name, bias=True: Dense(  # noqa: E731
            (n,), axes, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            stddev=cfg.initializer_range, name=name)
        out = {}
        if cfg.mlm_head:  # transform -> norm -> tied decoder + bias (BERT)
            h = dense(cfg.d_model, ("embed", "mlp"), "mlm_transform")(hidden)
            h = ACTIVATIONS["gelu_exact"](h.astype(jnp.float32)).astype(h.dtype)
            h = make_norm(cfg, "mlm_norm")(h)
            bias = param(self, "mlm_bias", nn.initializers.zeros, (cfg.vocab_size,), ("vocab",),
                         jnp.dtype(cfg.param_dtype))
            logits = embedder.attend(h) + bias.astype(jnp.float32)
            out["logits"] = constrain(logits, ("batch", "length", "vocab"))
        if cfg.pooler:
            pooled = jnp.tanh(dense(cfg.d_model, ("embed", "mlp"), "pooler")(hidden[:, 0])
                              .astype(jnp.float32)).astype(hidden.dtype)
        else:
            pooled = last_token(hidden, segments)
        out["pooled"] = pooled
        if cfg.nsp_head:
            out["nsp_logits"] = (
                dense(2, ("mlp", "classes"), "nsp")(pooled).astype(jnp.float32))
        if cfg.num_labels:
            pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
            out["class_logits"] = dense(cfg.num_labels, ("mlp", "classes"), "classifier")(
                pooled).astype(jnp.float32)
        return out
