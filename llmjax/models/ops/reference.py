"""The model's math, written once: dense, tied-head logits, norm, activation, attention.

Plain jnp / einsum that XLA differentiates and fuses (what TPU and GPU want). Every other
implementation in this package has the same signature and is tested against these
(tests/test_kernels.py, tests/test_splash.py); `ops.select` picks one from the config.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30  # finite, so fully masked (padding) rows give a uniform softmax, not NaN

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def dense(x: Array, kernel: Array, bias: Optional[Array], *, in_dims: int, dtype) -> Array:
    """x W (+ b) over the trailing `in_dims` dims of x, for a kernel of shape
    in_shape + out_shape; operands in `dtype`, f32 accumulation and bias, result in `dtype`."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    n_out = kernel.ndim - in_dims
    batch = letters[: x.ndim - in_dims]
    contract = letters[x.ndim - in_dims: x.ndim]
    out = letters[x.ndim: x.ndim + n_out].upper()
    y = jnp.einsum(f"{batch}{contract},{contract}{out}->{batch}{out}", x.astype(dtype),
                   kernel.astype(dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


def attend(x: Array, table: Array, *, dtype) -> Array:
    """Logits x E^T in f32 for a table [vocab, d] (the tied LM head)."""
    return jnp.einsum("...d,vd->...v", x.astype(dtype), table.astype(dtype),
                      preferred_element_type=jnp.float32)


def standardize(x32: Array, kind: str, eps: float) -> tuple[Array, Array]:
    """(x_hat, 1/std) of f32 x over its last axis: LayerNorm centres first, RMSNorm does not."""
    if kind == "layernorm":
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return x32 * rstd, rstd


def norm(x: Array, scale: Array, bias: Optional[Array], *, kind: str, eps: float,
         dtype) -> Array:
    """LayerNorm (kind='layernorm', bias optional) or RMSNorm ('rmsnorm'), in f32."""
    xhat, _ = standardize(x.astype(jnp.float32), kind, eps)
    y = xhat * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


def activation(fn: Callable[[Array], Array], a: Array, b: Optional[Array], *, dtype) -> Array:
    """fn(a), or fn(a) * b when gated (SwiGLU, GeGLU), in f32, returned in `dtype`."""
    h = fn(a.astype(jnp.float32))
    return (h if b is None else h * b.astype(jnp.float32)).astype(dtype)


def causal_mask(t: int, s: int) -> Array:
    """[1, 1, t, s]: query i sees keys j <= i + (s - t) (aligned at the last key, so keys
    prepended before the sequence, such as prefix tuning's, are seen by every query)."""
    return (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None, None]


def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              bias: Optional[Array] = None, segments=None, causal: bool = False,
              scale: float, dropout: Optional[Callable[[Array], Array]] = None) -> Array:
    """softmax(q k^T * scale + bias, masked) v, for any number of key/value heads.

    q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; mask: [b, 1, t, s] bool; bias:
    [b, heads, t, s]. `causal`: keys after the diagonal (causal_mask) are hidden; a given
    mask must already hide them (the model's do), a kernel may then skip their work.
    `segments` (q_segments, k_segments) restate the mask for kernels that cannot take a
    dense one (splash); unused here. `dropout` drops attention probabilities (training
    with model.attention_dropout, as BERT / GPT-2 / T5 do). Returns [b, t, heads, d].
    """
    del segments
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    if causal and mask is None:
        mask = causal_mask(t, k.shape[1])
    q = q.reshape(b, t, kv_heads, group, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.reshape(b, kv_heads, group, t, -1).astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    probs = probs.astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, heads, d).astype(v.dtype)
