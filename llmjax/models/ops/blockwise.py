"""Blockwise attention for XLA:CPU: query blocks, causal key skipping, recompute in backward.

Same contract as reference.attention. The queries are cut into blocks of `block` rows; each
block attends to the keys it can see (under a causal mask only the key prefix up to its last
row: with n blocks, (n - 1) / 2n of a causal sequence's score work is skipped) with an
exact softmax over that prefix. The full [b, h, t, s] scores never exist, only each block's
[b, h, block, keys] piece; the backward keeps the per-row log-sum-exp (not the
probabilities) and recomputes them block by block.

Why not an online softmax over key blocks (FlashAttention's inner loop)? On XLA:CPU a whole
key row of one query block is a few large batched dots; an inner loop over key blocks would
cut them into many small dots plus rescaling passes over the accumulator, which suits a
fused accelerator kernel, not XLA:CPU's op-by-op execution (not measured here; the row of
one block is at most 1/MAX_BLOCKS of the score matrix, which bounds the memory anyway).
The blocks are unrolled at trace time (`_blocks` keeps their number at most MAX_BLOCKS).

`causal` follows the bottom-right convention: query i sees keys j <= i + (s - t), which
covers keys prepended by prefix tuning (s = t + n); the dense `mask` still decides which of
those keys are allowed. Rows that see no key at all (padding) come out as the mean of all
values, as the reference's finite -1e30 mask gives, with no gradient into q or k.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from llmjax.models.ops import reference
from llmjax.models.ops.cpu import _mm, _physical, _stash, _t, _tn, _unstash

Array = jax.Array
NEG_INF = reference.NEG_INF
# Query rows per block by operand width (benchmarks/NOTES.md, reference GPT's [8, 256, 6 x 64]:
# f32 128 beat 64 and 32; bf16 64 beat 128 and 32).
BLOCK = {4: 128, 2: 64}
MAX_BLOCKS = 16  # longer sequences get proportionally larger blocks (bounded unrolling)


def _blocks(t: int, s: int, causal: bool, block: int) -> tuple[tuple[int, int, int], ...]:
    """(q0, q1, keys) per query block: rows [q0, q1) attend to keys [0, keys)."""
    block = max(block, -(-t // MAX_BLOCKS))
    out = []
    for q0 in range(0, t, block):
        q1 = min(t, q0 + block)
        keys = min(s, q1 + s - t) if causal else s
        out.append((q0, q1, max(keys, 1)))
    return tuple(out)


def _rows(x: Array) -> Array:
    """[b, kh, g, t, n] -> [b, kh, g*t, n]: every dot is a batched [m, k] @ [k, n]."""
    return x.reshape(x.shape[:2] + (-1, x.shape[-1]))


def _block_scores(q, k, mask, bias, scale, q0, q1, keys):
    """Masked scores of query rows [q0, q1) against keys [0, keys): [b, kh, g, rows, keys]."""
    qb = q[..., q0:q1, :]
    s = _mm(_rows(qb), _t(k[..., :keys, :])).reshape(qb.shape[:-1] + (keys,)) * scale
    if bias is not None:
        s = s + bias[..., q0:q1, :keys].astype(jnp.float32)
    if mask is not None:
        s = jnp.where(mask[..., q0:q1, :keys], s, NEG_INF)
    return s


def _empty_rows(mask: Optional[Array], shape) -> Optional[Array]:
    """[b, 1|kh, 1|g, t, 1] rows that see no key (None without a mask)."""
    if mask is None:
        return None
    return jnp.broadcast_to(~jnp.any(mask, axis=-1, keepdims=True), mask.shape[:-1] + (1,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, mask, bias, scale, causal, block, dtype):
    return _forward(q, k, v, mask, bias, scale, causal, block, dtype)[0]


def _forward(q, k, v, mask, bias, scale, causal, block, dtype):
    t, s = q.shape[-2], k.shape[-2]
    outs, lses = [], []
    for q0, q1, keys in _blocks(t, s, causal, block):
        sc = _block_scores(q, k, mask, bias, scale, q0, q1, keys)
        m = jnp.max(sc, axis=-1, keepdims=True)
        p = jnp.exp(sc - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = _mm(_rows(p.astype(dtype)), v[..., :keys, :]).reshape(sc.shape[:-1] + v.shape[-1:])
        outs.append(o / total)
        lses.append(m + jnp.log(total))
    out = jnp.concatenate(outs, axis=-2) if len(outs) > 1 else outs[0]
    lse = jnp.concatenate(lses, axis=-2) if len(lses) > 1 else lses[0]  # [b, kh, g, t, 1]
    empty = _empty_rows(mask, out.shape)
    if empty is not None:  # the reference's uniform softmax over all s keys
        mean = jnp.mean(v.astype(jnp.float32), axis=-2, keepdims=True)[:, :, None]
        out = jnp.where(empty, mean, out)
    out = out.astype(dtype)
    return out, (_stash(q), _stash(k), _stash(v), mask, bias, lse, _stash(out))


def _backward(scale, causal, block, dtype, res, g):
    q, k, v, mask, bias, lse, out = res
    q, k, v, out = (_unstash(x, dtype) for x in (q, k, v, out))
    t, s = q.shape[-2], k.shape[-2]
    g = g.astype(dtype)
    # Softmax backward's row term rowsum(dp * p) = rowsum(g * out) (FlashAttention's D).
    row = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    empty = _empty_rows(mask, out.shape)
    dq, dbias = [], []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for q0, q1, keys in _blocks(t, s, causal, block):
        sc = _block_scores(q, k, mask, bias, scale, q0, q1, keys)
        p = jnp.exp(sc - lse[..., q0:q1, :])
        if empty is not None:  # their uniform probabilities are added to dv below
            p = jnp.where(empty[..., q0:q1, :], 0.0, p)
        gb = _rows(g[..., q0:q1, :])  # [b, kh, g*rows, d]
        pc = p.astype(dtype)
        dv = dv.at[..., :keys, :].add(_tn(_rows(pc), gb))
        dp = _mm(gb, _t(v[..., :keys, :])).reshape(p.shape)
        ds = p * (dp - row[..., q0:q1, :])
        if bias is not None:
            dbias.append(jnp.pad(ds, [(0, 0)] * (ds.ndim - 1) + [(0, s - keys)]))
        dsc = (ds * scale).astype(dtype)
        dq.append(_mm(_rows(dsc), k[..., :keys, :]).reshape(q[..., q0:q1, :].shape))
        dk = dk.at[..., :keys, :].add(_tn(_rows(dsc), _rows(q[..., q0:q1, :])))
    if empty is not None:  # rows that saw nothing: d(mean of v) = their g / s, every key
        g_empty = jnp.sum(jnp.where(empty, g.astype(jnp.float32), 0.0), axis=(2, 3),
                          keepdims=True)[:, :, 0]  # [b, kh, 1, d]
        dv = dv + g_empty / s
    dq = jnp.concatenate(dq, axis=-2) if len(dq) > 1 else dq[0]
    db = None
    if bias is not None:
        full = jnp.concatenate(dbias, axis=-2) if len(dbias) > 1 else dbias[0]
        axes = tuple(i for i, (a, b) in enumerate(zip(full.shape, bias.shape))
                     if b == 1 and a != 1)
        db = jnp.sum(full, axis=axes, keepdims=True).astype(bias.dtype)
    return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype), None, db


_attention.defvjp(_forward, _backward)


def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              bias: Optional[Array] = None, segments=None, causal: bool = False,
              scale: float, dropout=None, block: Optional[int] = None) -> Array:
    """reference.attention: q [b, t, h, d], k/v [b, s, kh, d], mask [b, 1, t, s] bool, bias
    [b, h|1, t, s]; returns [b, t, h, d] in q's dtype. Heads move ahead of time so every
    batched matmul has its batch dimensions leading. No probability dropout."""
    del segments  # the dense mask states them
    if dropout is not None:
        raise ValueError("blockwise attention does not drop attention probabilities")
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    qh = _physical(jnp.transpose(q.reshape(b, t, kv_heads, group, d), (0, 2, 3, 1, 4)))
    kh = _physical(jnp.transpose(k, (0, 2, 1, 3)))
    vh = _physical(jnp.transpose(v, (0, 2, 1, 3)))
    s = k.shape[1]
    if causal and mask is None:  # the op needs the within-block part of the causal mask
        mask = reference.causal_mask(t, s)
    m = None if mask is None else mask[:, :, None]  # [b, 1, 1, t, s]
    bh = None
    if bias is not None:
        bh = bias.reshape((bias.shape[0], kv_heads, group) + bias.shape[2:]) \
            if bias.shape[1] == heads else bias[:, :, None]
    if block is None:
        block = BLOCK.get(jnp.dtype(q.dtype).itemsize, 64)
    out = _attention(qh, kh, vh, m, bh, float(scale), bool(causal), int(block),
                     jnp.dtype(q.dtype))  # [b, kh, g, t, d]
    return _physical(jnp.transpose(out, (0, 3, 1, 2, 4))).reshape(b, t, heads, d)
