"""Task heads on top of the final hidden states: BERT MLM and NSP, pooler, classifier."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models import ops
from llmjax.models.layers import ACTIVATIONS, Dense, constrain, make_norm, param

Array = jax.Array


def pool_positions(segments: Array, max_segments: int, first: bool) -> Array:
    """[b, max_segments] index of the first (encoder [CLS]) or last (decoder) token of packed
    segment k+1 in each row; 0 for segments absent from the row (their labels are unused)."""
    onehot = segments[:, :, None].astype(jnp.int32) == jnp.arange(1, max_segments + 1, dtype=jnp.int32)
    length = segments.shape[1]
    if first:
        index = jnp.argmax(onehot, axis=1)
    else:
        index = length - 1 - jnp.argmax(onehot[:, ::-1], axis=1)
    return jnp.where(jnp.any(onehot, axis=1), index, 0).astype(jnp.int32)


def last_token(hidden: Array, segments: Array) -> Array:
    """Hidden state of the last token of the first document in each row (decoder pooling)."""
    length = jnp.sum(segments == segments[:, :1], axis=1)
    idx = jnp.maximum(length - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


class Heads(nn.Module):
    """Whichever heads the config asks for; returns a dict of their outputs."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden: Array, segments: Array, embedder, deterministic: bool = True,
                 pool_index: Array | None = None):
        """`pool_index` [b, s] (packed classification rows): pool the hidden state at each
        index, giving pooled [b, s, d] and class_logits [b, s, labels]; otherwise one pooled
        vector per row ([CLS] for encoders, the first document's last token for decoders)."""
        cfg = self.cfg
        dense = lambda n, axes, name, bias=True: Dense(  # noqa: E731
            (n,), axes, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            stddev=cfg.initializer_range, kernels=cfg.kernels, name=name)
        out = {}
        if cfg.mlm_head:  # transform -> norm -> tied decoder + bias (BERT)
            h = dense(cfg.d_model, ("embed", "mlp"), "mlm_transform")(hidden)
            h = ops.kernels(cfg.kernels).activation(ACTIVATIONS["gelu_exact"], h, None,
                                                    dtype=h.dtype)
            h = make_norm(cfg, "mlm_norm")(h)
            bias = param(self, "mlm_bias", nn.initializers.zeros, (cfg.vocab_size,), ("vocab",),
                         jnp.dtype(cfg.param_dtype))
            logits = embedder.attend(h) + bias.astype(jnp.float32)
            out["logits"] = constrain(logits, ("batch", "length", "vocab"))
        if pool_index is not None:
            picked = jnp.take_along_axis(hidden, pool_index[:, :, None], axis=1)
        else:
            picked = hidden[:, 0] if cfg.pooler else last_token(hidden, segments)
        if cfg.pooler:
            pooled = jnp.tanh(dense(cfg.d_model, ("embed", "mlp"), "pooler")(picked)
                              .astype(jnp.float32)).astype(hidden.dtype)
        else:
            pooled = picked
        out["pooled"] = pooled
        if cfg.nsp_head:
            out["nsp_logits"] = (
                dense(2, ("mlp", "classes"), "nsp")(pooled).astype(jnp.float32))
        if cfg.num_labels:
            pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
            out["class_logits"] = dense(cfg.num_labels, ("mlp", "classes"), "classifier")(
                pooled).astype(jnp.float32)
        return out
