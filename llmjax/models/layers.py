"""Building blocks: dense, norms, embeddings, MLP, rotary and relative positions.

Every parameter is created with logical axis names (`embed`, `heads`, `kv`,
`mlp`, `vocab`, ...). How those map onto a device mesh lives only in
llmjax/parallel.py. The math runs in llmjax/models/ops/: a layer asks
`ops.kernels(model.kernels)` for its op and knows nothing of backends.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models import ops, rope
from llmjax.models.ops.reference import ACTIVATIONS

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def normal_init(stddev: float):
    return nn.initializers.normal(stddev=stddev)


def param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str | None],
          dtype) -> Array:
    """A parameter annotated with logical axis names (one per dimension)."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
    """Shard an activation by logical names (a no-op outside a mesh context)."""
    return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
    """y = x W (+ b) over the trailing `in_axes` dims of x, with a kernel of any rank.

    A kernel of shape in_shape + out_shape keeps heads as their own dimension
    (`embed, heads, kv`), which keeps the parameter tree readable and lets
    the rules table shard heads directly.
    """

    out_shape: Sequence[int]
    kernel_axes: Sequence[str | None]
    in_dims: int = 1
    use_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    stddev: float = 0.02
    kernels: str = "xla"  # model.kernels: auto | xla | cpu_custom_vjp (models/ops/)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[x.ndim - self.in_dims:]
        out_shape = tuple(self.out_shape)
        kernel = param(self, "kernel", normal_init(self.stddev), in_shape + out_shape,
                       self.kernel_axes, dtype_of(self.param_dtype))
        bias = None
        if self.use_bias:
            bias = param(self, "bias", nn.initializers.zeros, out_shape,
                         self.kernel_axes[self.in_dims:], dtype_of(self.param_dtype))
        return ops.kernels(self.kernels).dense(x, kernel, bias, in_dims=self.in_dims,
                                               dtype=dtype_of(self.dtype))


class Norm(nn.Module):
    """LayerNorm (mean and variance, scale and bias) or RMSNorm (scale only), in fp32."""

    kind: str = "layernorm"
    eps: float = 1e-5
    use_bias: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (features,), ("norm",),
                      dtype_of(self.param_dtype))
        bias = None
        if self.kind == "layernorm" and self.use_bias:
            bias = param(self, "bias", nn.initializers.zeros, (features,), ("norm",),
                         dtype_of(self.param_dtype))
        return ops.kernels(self.kernels).norm(x, scale, bias, kind=self.kind, eps=self.eps,
                                              dtype=dtype_of(self.dtype))


def make_norm(cfg: ModelConfig, name: str) -> Norm:
    return Norm(kind=cfg.norm, eps=cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, kernels=cfg.kernels, name=name)


class Embed(nn.Module):
    """A lookup table [num, embed]; `attend` reuses it as an output projection."""

    num_embeddings: int
    features: int
    axes: Sequence[str] = ("vocab", "embed")
    dtype: str = "float32"
    param_dtype: str = "float32"
    stddev: float = 0.02
    kernels: str = "xla"

    def setup(self):
        self.embedding = param(self, "embedding", normal_init(self.stddev),
                               (self.num_embeddings, self.features), self.axes,
                               dtype_of(self.param_dtype))

    def __call__(self, ids: Array) -> Array:
        # Gather from a table whose feature axis is whole (FSDP all-gathers it anyway);
        # a gather from an fsdp-sharded feature axis makes SPMD replicate the output.
        table = constrain(self.embedding, (self.axes[0], None))
        return jnp.take(table, ids, axis=0).astype(dtype_of(self.dtype))

    def attend(self, x: Array) -> Array:
        """Logits x E^T in fp32 (the tied LM head)."""
        return ops.kernels(self.kernels).attend(x, self.embedding, dtype=dtype_of(self.dtype))


class Mlp(nn.Module):
    """Feed-forward: wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated (SwiGLU, GeGLU)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        dense = lambda shape, axes, name, stddev=cfg.initializer_range: Dense(  # noqa: E731
            shape, axes, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            stddev=stddev, kernels=cfg.kernels, name=name)
        act = ACTIVATIONS[cfg.activation]
        if cfg.gated_mlp:
            a = dense((cfg.d_ff,), ("embed", "mlp"), "wi_0")(x)
            b = dense((cfg.d_ff,), ("embed", "mlp"), "wi_1")(x)
        else:
            a, b = dense((cfg.d_ff,), ("embed", "mlp"), "wi")(x), None
        h = ops.kernels(cfg.kernels).activation(act, a, b, dtype=dtype_of(cfg.dtype))
        h = constrain(h, ("batch", "length", "mlp"))
        if cfg.family == "t5":  # T5's DenseReluDense drops out between wi and wo; BERT, GPT-2, LLaMA do not
            h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return dense((cfg.d_model,), ("mlp", "embed"), "wo",
                     cfg.initializer_range / math.sqrt(2 * max(cfg.num_layers, 1)))(h)


class Adapter(nn.Module):
    """Houlsby bottleneck x + up(gelu(down x)); `up` starts at zero so it starts as identity."""

    dim: int
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        h = Dense((self.dim,), ("embed", "adapter"), use_bias=True, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, stddev=1e-3, kernels=cfg.kernels,
                  name="down")(x)
        h = ops.kernels(cfg.kernels).activation(ACTIVATIONS["gelu"], h, None, dtype=x.dtype)
        up = Dense((x.shape[-1],), ("adapter", "embed"), use_bias=True, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, stddev=0.0, kernels=cfg.kernels, name="up")(h)
        return x + up


def rotary(x: Array, positions: Array, cfg: ModelConfig) -> Array:
    """Rotary position embedding, half-split layout (x[:d/2], x[d/2:]) as in HF LLaMA, with
    the model's base (rope_theta) and long-context scaling (rope_scaling: models/rope.py).

    x: [batch, length, heads, head_dim]; positions: [batch, length].
    """
    freq = rope.inv_freq(cfg, x.shape[-1], positions)
    angles = positions.astype(jnp.float32)[:, :, None, None] * freq  # [b, t, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    if (scale := rope.attention_factor(cfg)) != 1.0:  # yarn
        sin, cos = sin * scale, cos * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def relative_bucket(relative: Array, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> Array:
    """T5's bucketing of (key - query) distances: exact when small, log-spaced when far."""
    bucket = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = jnp.maximum(-relative, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, distance, large)


class RelativeBias(nn.Module):
    """T5 relative position bias [batch, heads, q_len, k_len], shared by all layers of a stack."""

    cfg: ModelConfig
    bidirectional: bool

    @nn.compact
    def __call__(self, q_positions: Array, k_positions: Array) -> Array:
        cfg = self.cfg
        table = param(self, "embedding", normal_init(cfg.initializer_range),
                      (cfg.relative_buckets, cfg.num_heads), ("relpos_buckets", "heads"),
                      dtype_of(cfg.param_dtype))
        relative = k_positions[:, None, :] - q_positions[:, :, None]  # [b, q, k]
        buckets = relative_bucket(relative, self.bidirectional, cfg.relative_buckets,
                                  cfg.relative_max_distance)
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [b, q, k, heads]
        return jnp.transpose(bias, (0, 3, 1, 2))
