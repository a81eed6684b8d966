"""The CPU custom-VJP ops (`model.kernels: cpu_custom_vjp`, `auto` on the CPU backend).

The reference math (reference.py) is plain jnp/einsum and lets XLA differentiate and fuse
it; that is what TPU and GPU want. On XLA:CPU the automatic backward loses a lot of time
(see benchmarks/NOTES.md):

* XLA fuses elementwise backward ops (GELU', LayerNorm') with the transposed
  write that feeds the weight-gradient dot, which then runs at a small
  fraction of the matmul peak;
* XLA:CPU runs a bf16 dot on its bf16 (AMX) path only in the row-major
  [m, k] @ [k, n] form; every other dot (x^T g, g W^T, q k^T) is converted
  to f32, 2-3x slower;
* it has no 16-bit float dynamic-update-slice, so each bf16 residual that the
  layer scan stacks is converted to f32 and back around every update.

The functions here compute the reference's values with `jax.custom_vjp`: every dot is a
(batched) row-major matmul whose transposed operand is materialised first (_t, _tn),
residuals cross the scan bit-cast to uint16 (_stash), the MLP activation keeps only its
inputs, and the norm backward uses the closed-form formula. Attention is blockwise.py.
They share reference.py's signatures; tests/test_kernels*.py check outputs and gradients
against it for every model family, in fp32 and bf16.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from llmjax.models.ops import reference

Array = jax.Array


def _physical(x: Array) -> Array:
    """x (the result of a transpose) laid out row-major in memory, for a dot operand.

    XLA:CPU runs bf16 dots on the bf16 (AMX) path only as [.., m, k] @ [.., k, n] on
    row-major operands; any other dot is converted to f32 (2-3x slower). XLA folds a plain
    transpose into the dot or turns it into a layout change (even behind an optimization
    barrier), so 16-bit operands go through a flat buffer behind the barrier: that copy is
    physical. f32 dots take transposed operands at full speed: left to XLA.
    """
    if jnp.dtype(x.dtype).itemsize >= 4:
        return x
    return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


def _t(x: Array) -> Array:
    """x with its last two dims swapped, as a dot operand (see _physical)."""
    return _physical(jnp.swapaxes(x, -1, -2))


def _mm(a: Array, b: Array) -> Array:
    """[.., m, k] @ [.., k, n] with f32 accumulation, leading dims batched (the one dot
    form XLA:CPU runs at peak in bf16)."""
    batch = tuple(range(a.ndim - 2))
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)),
                               preferred_element_type=jnp.float32)


def _tn(a: Array, b: Array) -> Array:
    """a^T @ b for a [.., n, k] and b [.., n, m] (contracting the rows) as a row-major dot,
    transposing whichever costs fewer elements: a, or b and the [.., m, k] product."""
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    if jnp.dtype(a.dtype).itemsize >= 4 or n * k <= n * m + k * m:
        return _mm(_t(a), b)
    # The barrier stops XLA from folding the transpose back into the dot (as a dot that
    # contracts the leading dims, which XLA:CPU then cannot run in bf16 at all).
    return jnp.swapaxes(jax.lax.optimization_barrier(_mm(_t(b), a)), -1, -2)


def _stash(x: Array) -> Array:
    """x as a residual for the backward pass.

    Under the layer scan every residual is stacked with a dynamic-update-slice per layer.
    XLA:CPU has no 16-bit float dynamic-update-slice: it converts the whole stack to f32
    and back around each update (and hoists f32 copies of it before the backward loop).
    A 16-bit float is therefore kept bit-cast to uint16, which it moves natively.
    """
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _unstash(x: Array, dtype) -> Array:
    """The residual _stash kept, back as `dtype` (the dtype it had)."""
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


# ----------------------------------------------------------------------------
# Dense: y = x W over the trailing `in_dims` dims of x, any kernel rank.

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense2d(x2: Array, kernel: Array, dtype, out_dtype) -> Array:
    """x2 [n, k] @ kernel (any rank, its leading dims flattening to k) in `out_dtype`."""
    return _mm(x2.astype(dtype), _as_matrix(kernel, x2).astype(dtype)).astype(out_dtype)


def _as_matrix(kernel: Array, x2: Array) -> Array:
    return kernel.reshape(x2.shape[1], -1)


def _dense2d_fwd(x2, kernel, dtype, out_dtype):
    xc = x2.astype(dtype)
    y = _mm(xc, _as_matrix(kernel, x2).astype(dtype)).astype(out_dtype)
    # The kernel itself is the residual, not its cast copy: under the layer scan it is a
    # slice of the stacked parameters, which JAX forwards instead of stacking it again.
    return y, (_stash(xc), kernel, jnp.zeros((0,), x2.dtype))


def _dense2d_bwd(dtype, out_dtype, res, g):
    xc, kernel, x_like = res
    xc = _unstash(xc, dtype)
    g = g.astype(dtype)
    dx = _mm(g, _t(_as_matrix(kernel, xc).astype(dtype))).astype(x_like.dtype)  # g W^T
    dw = _tn(xc, g).reshape(kernel.shape).astype(kernel.dtype)  # x^T g
    return dx, dw


_dense2d.defvjp(_dense2d_fwd, _dense2d_bwd)


def dense(x: Array, kernel: Array, bias: Optional[Array], *, in_dims: int, dtype) -> Array:
    """reference.dense: the bias is added in f32 to an f32 product, before the cast."""
    if bias is None:
        return _dense(x, kernel, in_dims, dtype, dtype)
    y = _dense(x, kernel, in_dims, dtype, jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(dtype)


def _dense(x, kernel, in_dims, dtype, out_dtype):
    lead = x.shape[: x.ndim - in_dims]
    k = 1
    for n in kernel.shape[:in_dims]:
        k *= n
    y = _dense2d(x.reshape(-1, k), kernel, jnp.dtype(dtype), jnp.dtype(out_dtype))
    return y.reshape(lead + kernel.shape[in_dims:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _attend2d(x2: Array, table: Array, dtype) -> Array:
    return _mm(x2.astype(dtype), _t(table.astype(dtype)))


def _attend2d_fwd(x2, table, dtype):
    xc = x2.astype(dtype)
    y = _mm(xc, _t(table.astype(dtype)))
    return y, (_stash(xc), table, jnp.zeros((0,), x2.dtype))  # the table itself, as in dense


def _attend2d_bwd(dtype, res, g):
    xc, table, x_like = res
    xc = _unstash(xc, dtype)
    g = g.astype(dtype)
    dx = _mm(g, table.astype(dtype)).astype(x_like.dtype)  # [n, v] @ [v, d]
    dt = _tn(g, xc).astype(table.dtype)  # g^T x: [v, n] @ [n, d]
    return dx, dt


_attend2d.defvjp(_attend2d_fwd, _attend2d_bwd)


def attend(x: Array, table: Array, *, dtype) -> Array:
    """reference.attend: x E^T in f32 (the tied LM head), table [vocab, d]."""
    lead = x.shape[:-1]
    y = _attend2d(x.reshape(-1, x.shape[-1]), table, jnp.dtype(dtype))
    return y.reshape(lead + (table.shape[0],))


# ----------------------------------------------------------------------------
# LayerNorm / RMSNorm in f32 with a closed-form backward.

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _norm(x, scale, bias, kind, eps, out_dtype):
    return _norm_fwd(x, scale, bias, kind, eps, out_dtype)[0]


def _norm_fwd(x, scale, bias, kind, eps, out_dtype):
    xhat, rstd = reference.standardize(x.astype(jnp.float32), kind, eps)
    y = xhat * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype), (xhat, rstd, scale, bias, jnp.zeros((0,), x.dtype))


def _norm_bwd(kind, eps, out_dtype, res, g):
    xhat, rstd, scale, bias, x_like = res
    x_dtype = x_like.dtype
    g = g.astype(jnp.float32)
    features = xhat.shape[-1]
    gy = g * scale.astype(jnp.float32)
    proj = jnp.sum(gy * xhat, axis=-1, keepdims=True) / features
    if kind == "layernorm":
        dx = rstd * (gy - jnp.sum(gy, axis=-1, keepdims=True) / features - xhat * proj)
    else:
        dx = rstd * (gy - xhat * proj)
    lead = tuple(range(g.ndim - 1))
    dscale = jnp.sum(g * xhat, axis=lead).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(g, axis=lead).astype(bias.dtype)
    return dx.astype(x_dtype), dscale, dbias


_norm.defvjp(_norm_fwd, _norm_bwd)


def norm(x: Array, scale: Array, bias: Optional[Array], *, kind: str, eps: float,
         dtype) -> Array:
    """reference.norm with the closed-form backward."""
    return _norm(x, scale, bias, kind, float(eps), jnp.dtype(dtype))


# ----------------------------------------------------------------------------
# MLP hidden activation: act(a) or act(a) * b, computed in f32, returned in `dtype`.

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _activation(fn, dtype, a, b):
    return _activation_value(fn, dtype, a, b)


def _activation_value(fn, dtype, a, b):
    return reference.activation(fn, a, b, dtype=dtype)


def _activation_fwd(fn, dtype, a, b):
    # Only the (16-bit) inputs are kept: recomputing act in the backward is cheaper on
    # XLA:CPU than storing and reloading its f32 internals for every layer.
    res = (_stash(a), None if b is None else _stash(b), jnp.zeros((0,), a.dtype))
    return _activation_value(fn, dtype, a, b), res


def _activation_bwd(fn, dtype, res, g):
    a, b, a_like = res
    a = _unstash(a, a_like.dtype)
    b = None if b is None else _unstash(b, a_like.dtype)
    b32 = None if b is None else b.astype(jnp.float32)
    _, vjp = jax.vjp(lambda a, b: _activation_value(fn, jnp.float32, a, b),
                     a.astype(jnp.float32), b32)
    da, db = vjp(g.astype(jnp.float32))
    return da.astype(a.dtype), None if b is None else db.astype(b.dtype)


_activation.defvjp(_activation_fwd, _activation_bwd)


def activation(fn, a: Array, b: Optional[Array], *, dtype) -> Array:
    """reference.activation (a and b share one dtype), keeping only its inputs."""
    return _activation(fn, jnp.dtype(dtype), a, b)
