"""Attention with the sequence sharded over a `context` mesh axis (context parallelism).

Every device holds t / context of the queries, keys and values. Two strategies:

- "allgather": each device all-gathers K/V (with their segments, positions and prefix flags)
  over the context axis and attends its own queries to all of them;
- "ring": K/V chunks travel around the ring of context shards (`jax.lax.ppermute`), one step
  per shard; every device folds each chunk it holds into an online-softmax carry (running
  max, sum, f32 accumulator) and passes it on.

Either way a device visits its scores in [block, block] tiles (a block of its queries
against a block of the keys it holds) with an online softmax, so it never holds its
[t_local, t] scores, only one tile's. Tiles no query of them can see (later keys under a
causal mask, other documents, padding) are skipped (`lax.cond`): about half the causal work,
and with the load-balanced order (tiles never straddle its chunks) every shard skips as much.
The backward pass is a custom VJP that keeps only the local q, k, v, output and the per-row
log-sum-exp and recomputes the probabilities tile by tile (FlashAttention's backward):
allgather gathers K/V again and reduce-scatters their gradients; the ring sends K/V around
again with their gradient accumulators, which arrive back at their owner after a full turn.
No temporary grows with t^2; the local ones shrink as 1/context (docs/long-context.md).

The mask is rebuilt from segment ids, positions and the prefix flags (the dense mask of
llmjax.models.attention.make_mask never exists): a key is visible from a query of the same
non-zero segment when `index[key] <= index[query]` (causal), or when both are in the
prefix-LM prefix, or always (not causal). `index` is each token's original position, so the
model may reorder the sequence (`load_balance_order`) to give every shard equal causal work.
Padding queries (segment 0) see nothing and output 0.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import ConfigError
from llmjax.models.ops.splash import _mesh_axes

Array = jax.Array
STRATEGIES = ("allgather", "ring")
BLOCK = 512  # queries and keys per tile: the score piece is [b, heads, BLOCK, BLOCK]
NEG = -1e30  # finite: a row that has seen nothing yet keeps a finite running max


def load_balance_order(t: int, shards: int) -> np.ndarray:
    """The token order that gives every context shard equal causal work: [t] original positions.

    The sequence is cut into 2 * shards chunks; shard i gets chunk i and chunk 2*shards-1-i
    (early queries see few keys, late ones many: the pair evens it out). The model reorders
    tokens, positions, segments and targets with it (x[:, order]) and passes it as `index`."""
    if shards < 1:
        raise ConfigError(f"mesh.context={shards} must be at least 1")
    chunks = 2 * shards
    if t % chunks:
        raise ConfigError(f"train.seq_len={t} is not divisible by 2 x mesh.context={chunks}: "
                          f"load balancing cuts the sequence into 2 x context equal chunks; "
                          f"choose a seq_len that is a multiple of {chunks}")
    size = t // chunks
    pieces = []
    for i in range(shards):
        pieces += [np.arange(i * size, (i + 1) * size),
                   np.arange((chunks - 1 - i) * size, (chunks - i) * size)]
    return np.concatenate(pieces).astype(np.int32)


class Tokens(NamedTuple):
    """What the mask needs of a run of tokens: segments [b, n] int32 (0 = padding), index [n]
    int32 (original positions), prefix [b, n] bool or None."""

    segments: Array
    index: Array
    prefix: Optional[Array]


class Static(NamedTuple):
    """The op's static settings (hashable: the custom VJP's non-differentiable argument)."""

    strategy: str
    axis: Optional[str]  # None: no context axis to communicate over (size 1 or absent)
    shards: int
    causal: bool
    scale: float
    block: int


def _visible(qt: Tokens, kt: Tokens, causal: bool) -> Array:
    """[b, tq, tk] bool: which keys each query sees."""
    seen = (qt.segments[:, :, None] == kt.segments[:, None, :]) & (kt.segments[:, None, :] != 0)
    if causal:
        order = (kt.index[None, :] <= qt.index[:, None])[None]
        if qt.prefix is not None:
            order = order | (qt.prefix[:, :, None] & kt.prefix[:, None, :])
        seen = seen & order
    return seen


def _split(x: Array, axis: int, block: int) -> Array:
    """Cut `axis` into blocks of `block`: [.., n, ..] -> [n / block, .., block, ..] (the
    block number leads, for lax.scan)."""
    n = x.shape[axis]
    x = x.reshape(x.shape[:axis] + (n // block, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge(x: Array, axis: int) -> Array:
    """The inverse of _split(x, axis, block)."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _split_tokens(tokens: Tokens, block: int) -> Tokens:
    prefix = None if tokens.prefix is None else _split(tokens.prefix, 1, block)
    return Tokens(_split(tokens.segments, 1, block), _split(tokens.index, 0, block), prefix)


def _block_size(n: int, block: int) -> int:
    """The largest divisor of n that is at most `block`."""
    return next(c for c in range(min(n, block), 0, -1) if n % c == 0)


def _scores(q: Array, k: Array, scale: float) -> Array:
    """q [b, tq, kh, g, d], k [b, tk, kh, d] -> f32 scores [b, kh, g, tq, tk]."""
    return jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale


def _tiles(q, k, v, qt: Tokens, kt: Tokens, st: Static):
    """Query blocks (q [nq, b, bq, kh, g, d] and their tokens) and key blocks (k, v
    [nk, b, bk, kh, d] and their tokens): the [bq, bk] tiles of the scores are visited one at
    a time, and a tile no query of it can see is skipped."""
    bq, bk = _block_size(q.shape[1], st.block), _block_size(k.shape[1], st.block)
    return ((_split(q, 1, bq), _split_tokens(qt, bq)),
            (_split(k, 1, bk), _split(v, 1, bk), _split_tokens(kt, bk)), bq)


def _fold(carry, q: Array, k: Array, v: Array, qt: Tokens, kt: Tokens, st: Static):
    """Fold keys/values [b, n, kh, d] into the online-softmax carry (m, l, acc), tile by
    tile: m, l [b, kh, g, tq, 1] the running max and sum, acc [b, kh, g, tq, d] f32."""
    (qs, qts), keys, bq = _tiles(q, k, v, qt, kt, st)

    def query_block(_, xs):
        qb, qtb, carry = xs

        def key_block(carry, blk):
            kb, vb, ktb = blk

            def attend(carry, seen):
                m, l, acc = carry
                seen = seen[:, None, None]
                s = jnp.where(seen, _scores(qb, kb, st.scale), NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
                p = jnp.where(seen, jnp.exp(s - m_new), 0.0)
                fade = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(vb.dtype), vb,
                                preferred_element_type=jnp.float32)
                return m_new, l * fade + jnp.sum(p, axis=-1, keepdims=True), acc * fade + pv

            seen = _visible(qtb, ktb, st.causal)
            return jax.lax.cond(jnp.any(seen), attend, lambda c, _: c, carry, seen), None

        return None, jax.lax.scan(key_block, carry, keys)[0]

    blocked = jax.tree.map(lambda x: _split(x, 3, bq), carry)
    return jax.tree.map(lambda x: _merge(x, 3),
                        jax.lax.scan(query_block, None, (qs, qts, blocked))[1])


def _fold_grads(q, k, v, qt, kt, g, lse, row, st: Static):
    """Gradient contributions of keys/values [b, n, kh, d] (recomputing their probabilities
    tile by tile from the saved log-sum-exp): dq [b, tq, kh, g, d], dk and dv [b, n, kh, d],
    all f32."""
    (qs, qts), keys, bq = _tiles(q, k, v, qt, kt, st)
    dtype = q.dtype

    def query_block(dkv, xs):
        qb, qtb, gb, lseb, rowb = xs

        def key_block(dq, blk):
            kb, vb, ktb = blk

            def grads(dq, seen):
                seen = seen[:, None, None]
                p = jnp.where(seen, jnp.exp(_scores(qb, kb, st.scale) - lseb), 0.0)
                dv = jnp.einsum("bkgts,btkgd->bskd", p.astype(dtype), gb,
                                preferred_element_type=jnp.float32)
                dp = jnp.einsum("btkgd,bskd->bkgts", gb, vb, preferred_element_type=jnp.float32)
                ds = (p * (dp - rowb) * st.scale).astype(dtype)
                dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kb,
                                     preferred_element_type=jnp.float32)
                dk = jnp.einsum("bkgts,btkgd->bskd", ds, qb, preferred_element_type=jnp.float32)
                return dq, (dk, dv)

            def nothing(dq, _):
                zeros = jnp.zeros(kb.shape, jnp.float32)
                return dq, (zeros, zeros)

            seen = _visible(qtb, ktb, st.causal)
            return jax.lax.cond(jnp.any(seen), grads, nothing, dq, seen)

        dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), keys)
        return (dkv[0] + _merge(dk, 1), dkv[1] + _merge(dv, 1)), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    blocked = (qs, qts, _split(g, 1, bq), _split(lse, 3, bq), _split(row, 3, bq))
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), blocked)
    return _merge(dq, 1), dk, dv


def _gather(x, st: Static):
    """All-gather a local [b, n, ...] (or [n] index) piece along its sequence axis."""
    if x is None or st.axis is None:
        return x
    return jax.lax.all_gather(x, st.axis, axis=0 if x.ndim == 1 else 1, tiled=True)


def _gather_tokens(kt: Tokens, st: Static) -> Tokens:
    return Tokens(*(_gather(x, st) for x in kt))


def _pass_on(tree, st: Static):
    """Send every array of `tree` to the next context shard (device i -> i + 1)."""
    perm = [(i, (i + 1) % st.shards) for i in range(st.shards)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, st.axis, perm), tree)


def _forward(q, k, v, qt: Tokens, kt: Tokens, st: Static):
    """q [b, tq, kh, g, d] local queries, k/v [b, tq, kh, d] local keys (their tokens qt, kt)
    -> (out [b, tq, kh, g, d] in q's dtype, lse [b, kh, g, tq, 1] f32)."""
    # The tokens (segments, index) are the same in every layer. Under nn.scan, jax's scan
    # partial evaluation hoists whatever depends only on loop invariants out of the layer loop
    # and keeps it for the backward: every tile's mask, stacked, i.e. a [t_local, t] array per
    # device (960 MiB at 8K tokens, context 2). A zero that depends on q keeps the masks
    # inside the loop, built per tile (measured: 3,037 -> 970 MiB temporaries).
    first = q.reshape(-1)[0]
    dep = (first == first).astype(jnp.int32) * 0
    qt = Tokens(qt.segments + dep, qt.index + dep, qt.prefix)
    kt = Tokens(kt.segments + dep, kt.index + dep, kt.prefix)
    shape = (q.shape[0], q.shape[2], q.shape[3], q.shape[1], 1)
    carry = (jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
             jnp.zeros(shape[:-1] + (q.shape[-1],), jnp.float32))
    if st.strategy == "allgather" or st.axis is None:
        carry = _fold(carry, q, _gather(k, st), _gather(v, st), qt, _gather_tokens(kt, st), st)
    else:
        def ring_step(state, _):
            carry, (kc, vc, ktc) = state
            after = _pass_on((kc, vc, ktc), st)  # independent of the fold: can overlap it
            return (_fold(carry, q, kc, vc, qt, ktc, st), after), None

        (carry, (kc, vc, ktc)), _ = jax.lax.scan(ring_step, (carry, (k, v, kt)), None,
                                                 length=st.shards - 1)
        carry = _fold(carry, q, kc, vc, qt, ktc, st)  # the last chunk stays put
    m, l, acc = carry
    seen_any = l > 0  # padding queries see nothing: output 0, no gradient
    out = jnp.where(seen_any, acc / jnp.where(seen_any, l, 1.0), 0.0)
    lse = jnp.where(seen_any, m + jnp.log(jnp.where(seen_any, l, 1.0)), 0.0)
    return jnp.einsum("bkgtd->btkgd", out).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _local_attention(q, k, v, qt: Tokens, kt: Tokens, st: Static):
    return _forward(q, k, v, qt, kt, st)[0]


def _local_fwd(q, k, v, qt, kt, st):
    out, lse = _forward(q, k, v, qt, kt, st)
    return out, (q, k, v, qt, kt, out, lse)


def _local_bwd(st: Static, res, g):
    q, k, v, qt, kt, out, lse = res
    g = g.astype(q.dtype)
    # Softmax backward's row term rowsum(dP * P) = rowsum(g * out) (FlashAttention's D).
    row = jnp.einsum("btkgd,btkgd->bkgt", g.astype(jnp.float32),
                     out.astype(jnp.float32))[..., None]
    if st.strategy == "allgather" or st.axis is None:
        dq, dk, dv = _fold_grads(q, _gather(k, st), _gather(v, st), qt, _gather_tokens(kt, st),
                                 g, lse, row, st)
        if st.axis is not None:  # the transpose of the all-gather: each shard's keys' sum
            dk, dv = (jax.lax.psum_scatter(x, st.axis, scatter_dimension=1, tiled=True)
                      for x in (dk, dv))
    else:
        # Each chunk travels with its gradient accumulators; after `shards` hops (the last
        # one below) the accumulators are back with the chunk's owner.
        def ring_step(state, _):
            dq, (kc, vc, ktc), (dk, dv) = state
            after = _pass_on((kc, vc, ktc), st)  # independent of the gradients: can overlap
            dq_i, dk_i, dv_i = _fold_grads(q, kc, vc, qt, ktc, g, lse, row, st)
            return (dq + dq_i, after, _pass_on((dk + dk_i, dv + dv_i), st)), None

        zeros = jnp.zeros(k.shape, jnp.float32)
        dq = jnp.zeros(q.shape, jnp.float32)
        (dq, (kc, vc, ktc), (dk, dv)), _ = jax.lax.scan(
            ring_step, (dq, (k, v, kt), (zeros, zeros)), None, length=st.shards - 1)
        dq_i, dk_i, dv_i = _fold_grads(q, kc, vc, qt, ktc, g, lse, row, st)
        dq = dq + dq_i
        dk, dv = _pass_on((dk + dk_i, dv + dv_i), st)
    none = Tokens(None, None, None)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), none, none


_local_attention.defvjp(_local_fwd, _local_bwd)


def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              bias: Optional[Array] = None, segments=None, causal: bool = False,
              scale: float, dropout=None, index: Optional[Array] = None,
              prefix: Optional[Array] = None, strategy: str = "allgather",
              axis: str = "context", block: int = BLOCK) -> Array:
    """softmax(q k^T * scale, masked) v with the sequence sharded over the mesh axis `axis`.

    q [b, t, heads, d]; k, v [b, t, kv_heads, d] (self-attention: the same t); segments
    (q_segments, k_segments) [b, t] int, 0 = padding; `index` [t] the original position of
    each token in the current order (None: arange(t)); `prefix` [b, t] bool, a prefix-LM's
    bidirectional prefix (with causal). `mask` is not read (the segments, index and prefix
    state it); no bias, no dropout. The mesh is the abstract mesh in context (jax.set_mesh):
    batch over the logical rules' "batch" axes, heads over "heads", sequence over `axis`
    (absent or size 1: no communication). `block`: the tile size (at most t / (2 context)
    under context parallelism; the largest divisor of the local length below it). Returns
    [b, t, heads, d] in q's dtype, sharded like q.
    """
    del mask
    if bias is not None or dropout is not None:
        raise ValueError("context-parallel attention takes no bias and no dropout")
    if segments is None:
        raise ValueError("context-parallel attention needs the segment ids")
    if strategy not in STRATEGIES:
        raise ConfigError(f"context-parallel attention strategy {strategy!r} is not one of "
                          f"{', '.join(STRATEGIES)}")
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    if k.shape[1] != t:
        raise ValueError(f"context-parallel attention is self-attention: {k.shape[1]} keys "
                         f"for {t} queries")
    q_segments, k_segments = (s.astype(jnp.int32) for s in segments)
    index = jnp.arange(t, dtype=jnp.int32) if index is None else index.astype(jnp.int32)
    if prefix is not None:
        prefix = prefix.astype(bool)
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else mesh.shape.get(axis, 1)
    if t % shards:
        raise ConfigError(f"train.seq_len={t} is not divisible by mesh.context={shards}: "
                          f"every context shard holds an equal piece of the sequence")
    if shards > 1:
        # A load-balanced shard holds two distant chunks of t / (2 context) tokens: tiles
        # within one chunk keep causal tile skipping (and so the balance) effective.
        block = min(block, max(t // (2 * shards), 1))
    st = Static(strategy, axis if shards > 1 else None, shards, bool(causal), float(scale),
                int(block))

    def run(q, k, v, q_segments, k_segments, index, *prefix):
        prefix = prefix[0] if prefix else None
        qg = q.reshape(q.shape[:2] + (k.shape[2], q.shape[2] // k.shape[2], q.shape[3]))
        out = _local_attention(qg, k, v, Tokens(q_segments, index, prefix),
                               Tokens(k_segments, index, prefix), st)
        return out.reshape(q.shape)

    args = (q, k, v, q_segments, k_segments, index) + (() if prefix is None else (prefix,))
    if mesh.empty:
        return run(*args)
    batch_axes = _without(_mesh_axes("batch", b, mesh), axis)
    head_axes = _without(_mesh_axes("heads", heads, mesh), axis)
    n_head_shards = math.prod(mesh.shape[a] for a in head_axes or ())
    if kv_heads % n_head_shards:
        # Key/value heads that cannot follow the query heads' split: one per query head.
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
        args = (q, k, v) + args[3:]
    seq = axis if shards > 1 else None
    qo = jax.P(batch_axes, seq, head_axes, None)
    tok = jax.P(batch_axes, seq)
    specs = (qo, qo, qo, tok, tok, jax.P(seq)) + (() if prefix is None else (tok,))
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=qo, check_vma=False)(*args)


def _without(axes: Optional[tuple[str, ...]], axis: str) -> Optional[tuple[str, ...]]:
    """Mesh axes minus the context axis (the sequence owns it); None when none remain."""
    axes = tuple(a for a in axes or () if a != axis)
    return axes or None
