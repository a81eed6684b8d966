"""Multi-head attention (MHA / MQA / GQA) with causal, padding, packed and prefix masks.

The seed's formula, per head: softmax(Q K^T / sqrt(d_k)) V with Q = X W^Q,
K = X W^K, V = X W^V; heads are concatenated and projected by W^O. Grouped
query attention shares each key/value head among num_heads / num_kv_heads
query heads; MQA is the case of one key/value head. The softmax(..) V computation is the
attention op that `ops.attention_op` picks (llmjax/models/ops/).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models import ops
from llmjax.models.context import Context
from llmjax.models.layers import (Dense, constrain, dtype_of, make_norm, normal_init, param,
                                  rotary)

Array = jax.Array


def make_mask(q_segments: Array, k_segments: Array, causal: bool,
              prefix: Optional[Array] = None, visible: int = 0) -> Array:
    """Which keys each query may see: [batch, 1, q_len, k_len] booleans.

    Segment ids separate packed documents (0 = padding, never visible).
    Causal masks by index within the row; `prefix` [batch, len] marks the
    bidirectional prefix of a prefix LM (prefix tokens see the whole prefix).
    The first `visible` keys (a soft prompt) are seen by every non-padding query.
    """
    allowed = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    if causal:
        q_len, k_len = q_segments.shape[1], k_segments.shape[1]
        lower = jnp.arange(k_len)[None, :] <= jnp.arange(q_len)[:, None]
        seen = lower[None]
        if prefix is not None:
            seen = seen | (prefix[:, :, None] & prefix[:, None, :])
        allowed = allowed & seen
    if visible:
        first = (jnp.arange(k_segments.shape[1]) < visible)[None, None, :]
        allowed = allowed | (first & (q_segments[:, :, None] != 0))
    return allowed[:, None]


class Attention(nn.Module):
    """Self- or cross-attention with optional RoPE, learned prefixes and a KV cache.

    Parameters: query [embed, heads, kv], key/value [embed, kv_heads, kv],
    out [heads, kv, embed] (`kv` is the per-head dimension).
    """

    cfg: ModelConfig
    cross: bool = False
    decode: bool = False  # autoregressive decoding with a KV cache in the "cache" collection
    causal: bool = False  # (self-attention) the mask is causal: lets the splash kernel skip blocks

    @nn.compact
    def __call__(self, x: Array, ctx: Context, deterministic: bool = True) -> Array:
        """x [b, t, d] -> [b, t, d]. Self-attention reads its mask, bias, positions, segments
        and prefix from `ctx`; cross-attention (cross=True) attends to `ctx.encoded` under
        `ctx.cross_mask`. The splash kernel rebuilds the mask from the segments and `causal`;
        `ctx.prefix` (a prefix-LM's bidirectional prefix, already in the mask) is a mask splash
        cannot express."""
        if self.cross:
            kv_input, mask, bias, prefix = ctx.encoded, ctx.cross_mask, None, None
            q_positions, k_positions, q_segments = ctx.positions, ctx.encoded_positions, None
        else:
            kv_input, mask, bias, prefix = x, ctx.mask, ctx.bias, ctx.prefix
            q_positions = k_positions = ctx.positions
            q_segments = ctx.segments
        cfg = self.cfg
        heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head

        def proj(n, axes, name, stddev):
            return Dense((n, head_dim), axes, use_bias=cfg.use_bias or cfg.qkv_bias,
                         dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, stddev=stddev, kernels=cfg.kernels,
                         name=name)

        std = cfg.initializer_range
        q = proj(heads, ("embed", "heads", "kv"), "query", std)(x)  # [b, t, heads, kv]
        # k, v: [b, s, kv_heads, kv]
        k = proj(kv_heads, ("embed", "kv_heads", "kv"), "key", std)(kv_input)
        v = proj(kv_heads, ("embed", "kv_heads", "kv"), "value", std)(kv_input)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        k = constrain(k, ("batch", "length", "kv_heads", "kv"))
        v = constrain(v, ("batch", "length", "kv_heads", "kv"))
        if cfg.qk_norm != "none":
            q, k = qk_norm(cfg, q, "query_norm"), qk_norm(cfg, k, "key_norm")
        if cfg.position == "rope" and not self.cross:
            q = rotary(q, q_positions, cfg)
            k = rotary(k, k_positions, cfg)

        if self.decode and not self.cross:
            k, v, mask = self._update_cache(k, v, q_positions, q_segments)
            if bias is not None and bias.shape[-1] != k.shape[1]:
                raise ValueError("relative bias must be computed against the cache length")

        if cfg.prefix_tokens:  # prefix tuning: learned keys/values every query may see
            k, v, mask, bias = self._prepend_prefix(k, v, mask, bias)

        scale = head_dim ** -0.5 if cfg.scale_attention else 1.0
        dropout = None
        if cfg.attention_dropout and not deterministic:
            drop = nn.Dropout(cfg.attention_dropout, name="probs_dropout")
            dropout = lambda p: drop(p, deterministic=False)  # noqa: E731
        attend = ops.attention_op(cfg, decode=self.decode, cross=self.cross,
                                  prefix_lm=prefix is not None, dropout=dropout is not None)
        # `causal` lets a kernel skip hidden keys: a decoding step's cache mask and a
        # prefix LM's bidirectional prefix are not the causal pattern.
        causal = self.causal and not self.decode and prefix is None
        segments = None if q_segments is None else (q_segments, q_segments)
        out = attend(q, k, v, mask=mask, bias=bias, segments=segments, causal=causal,
                     scale=scale, dropout=dropout)
        out = constrain(out, ("batch", "length", "heads", "kv"))
        return Dense((cfg.d_model,), ("heads", "kv", "embed"), in_dims=2, use_bias=cfg.use_bias,
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernels=cfg.kernels,
                     stddev=std / (2 * max(cfg.num_layers, 1)) ** 0.5, name="out")(out)

    def _prepend_prefix(self, k, v, mask, bias):
        cfg = self.cfg
        n, b = cfg.prefix_tokens, k.shape[0]
        shape = (n, cfg.kv_heads, cfg.dim_per_head)
        axes = ("prefix", "kv_heads", "kv")
        pk = param(self, "prefix_key", normal_init(cfg.initializer_range), shape, axes,
                   dtype_of(cfg.param_dtype))
        pv = param(self, "prefix_value", normal_init(cfg.initializer_range), shape, axes,
                   dtype_of(cfg.param_dtype))
        k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype), (b,) + shape), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype), (b,) + shape), v], axis=1)
        if mask is not None:
            sees_any = jnp.any(mask, axis=-1, keepdims=True)  # padding queries stay blind
            mask = jnp.concatenate([jnp.broadcast_to(sees_any, mask.shape[:3] + (n,)), mask], -1)
        if bias is not None:
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (n, 0)))
        return k, v, mask, bias

    def _update_cache(self, k, v, q_positions, q_segments):
        """Write this call's keys/values at the cache index; mask by cached segments."""
        cfg = self.cfg
        b, t = k.shape[:2]
        cache_shape = (b, cfg.max_len, cfg.kv_heads, cfg.dim_per_head)
        cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape, v.dtype)
        cached_seg = self.variable("cache", "segments", jnp.zeros, (b, cfg.max_len), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if q_segments is None:
            q_segments = jnp.ones((b, t), jnp.int32)
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
        cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, q_segments, (0, i))
        index.value = i + t
        k_index = jnp.arange(cfg.max_len)
        q_index = i + jnp.arange(t)
        mask = ((q_segments[:, :, None] == cached_seg.value[:, None, :])
                & (cached_seg.value[:, None, :] != 0)
                & (k_index[None, None, :] <= q_index[None, :, None]))
        return cached_k.value, cached_v.value, mask[:, None]


def qk_norm(cfg: ModelConfig, x: Array, name: str) -> Array:
    """Norm of queries or keys [b, t, n, head_dim]: per head (Qwen3) or over all n * head_dim
    features (OLMoE)."""
    if cfg.qk_norm == "head":
        return make_norm(cfg, name)(x)
    b, t, n, hd = x.shape
    return make_norm(cfg, name)(x.reshape(b, t, n * hd)).reshape(b, t, n, hd)
