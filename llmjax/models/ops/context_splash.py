"""The splash kernel under context parallelism (TPU): all-gathered K/V, sharded queries.

Every device holds t / context consecutive tokens (in the model's current order) of each
sequence. It all-gathers the keys, values and key segment ids over the `context` axis and
runs the Pallas splash kernel (splash.py) on its own queries against all t keys. The kernel
is built once for the whole [t, t] mask with `q_seq_shards=context`: its block tables
(which [block_q, block_kv] tiles are empty, full or partial) are computed in numpy at trace
time for every query shard and handed to shard_map split over `context`
(`manual_sharding_spec`), so each device skips the tiles its own queries cannot see.

The causal mask is the kernel's CausalMask evaluated on the queries' original positions:
the kernel reads a per-query position array (`q_sequence`, the mask info's one per-row
input) and compares it with the key's column. Keys are put back in their natural order
after the gather (a few static slices), so a key's column is its original position, and the
queries' positions are the model's static order (`context_parallel.load_balance_order`
when the model load-balances: each shard holds chunks i and 2C-1-i). One kernel serves every
shard; tiles are skipped per shard from the static order.

Gradients: the kernel's own VJP (dq, and dk/dv against all t keys) and the all-gather's
transpose, a reduce-scatter of dk/dv back to the keys' owners. Grouped-query attention runs
the MQA kernel per key/value head, as splash.py does.

Refused with ValueError (ops/select.py routes these to context_parallel's XLA op): an
additive bias, attention dropout, a prefix-LM prefix, the ring strategy (it passes K/V
chunks; this op gathers them), and a traced `index` whose order is not stated statically.
A local length that is not a multiple of the kernel's 128-wide blocks runs
context_parallel's XLA op (the same function).
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from llmjax.errors import ConfigError
from llmjax.models.ops import context_parallel as cp
from llmjax.models.ops import platform, splash

log = logging.getLogger(__name__)
Array = jax.Array


class OrderedCausalMask(sa.CausalMask):
    """The causal mask of [t, t] attention whose query rows are in the order `order` (row i
    is the token at original position order[i]) and whose key columns are in natural order:
    row i sees column j when j <= order[i]. The kernel evaluates it in each partial tile from
    the per-row positions (q_sequence); its block tables come from the same rows, so tiles
    are skipped exactly."""

    def __init__(self, order: np.ndarray):
        super().__init__((len(order), len(order)))
        self.q_sequence = np.asarray(order, np.int32)  # read by __getitem__, hash and kernel


def static_order(index, t: int, shards: int, causal: bool,
                 load_balance: bool) -> Optional[np.ndarray]:
    """The queries' original positions as numpy (None: natural order), known at trace time.

    Only a causal mask depends on it (without one, attention does not depend on the keys'
    order). A concrete `index` is read; a traced one (the model's, inside jit) must be the
    load-balancing order, which `load_balance` states."""
    if index is None or not causal:
        return None
    if isinstance(index, jax.core.Tracer):
        if load_balance and t % (2 * shards) == 0:
            return cp.load_balance_order(t, shards)
        raise ValueError("splash under context parallelism needs the token order at trace "
                         "time: pass load_balance=True when index is "
                         "context_parallel.load_balance_order(t, context), or a concrete index")
    order = np.asarray(index, np.int32)
    if order.shape != (t,) or not np.array_equal(np.sort(order), np.arange(t)):
        raise ValueError(f"index must be a permutation of range({t})")
    return None if np.array_equal(order, np.arange(t)) else order


def natural_runs(order: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) runs of consecutive original positions in `order`, in the order of
    their positions: concatenating x[start:start+length] puts x back in natural order
    (2 x context runs for the load-balanced order)."""
    breaks = np.flatnonzero(np.diff(order) != 1) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [len(order)]]))
    runs = sorted(zip(starts.tolist(), lengths.tolist()), key=lambda r: order[r[0]])
    return runs


def _unpermute(x: Array, runs, axis: int) -> Array:
    """x in the model's order along `axis` -> natural order (static slices, whose transpose
    is pads: no gather, no scatter)."""
    if runs is None:
        return x
    return jnp.concatenate([jax.lax.slice_in_dim(x, s, s + n, axis=axis) for s, n in runs],
                           axis=axis)


def _kernel(order: Optional[np.ndarray], t: int, shards: int, heads: int, causal: bool,
            mqa: bool, bq: int, interpret: bool):
    """(kernel, its shards): one kernel for all shards, the [t, t] causal mask's block tables
    per query shard; without a causal mask every shard's [t / shards, t] mask is full, one
    kernel of that shape serves them all (the kernel's q_seq_shards cannot split a mask
    without partial tiles: its mask_next is then empty)."""
    make = sa.make_splash_mqa if mqa else sa.make_splash_mha
    sizes = splash.block_sizes(bq, splash._block(t))
    if not causal:
        full = sa.MultiHeadMask([sa.FullMask((t // shards, t))] * heads)
        return make(full, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                    interpret=interpret), 1
    one = sa.CausalMask((t, t)) if order is None else OrderedCausalMask(order)
    return make(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                q_seq_shards=shards, interpret=interpret), shards


@functools.cache
def _warn_fallback(local: int) -> None:
    log.warning("splash under context parallelism needs seq_len / mesh.context (%d here) to be "
                "a multiple of %d: running context_parallel's XLA attention", local, splash.LANES)


def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              bias: Optional[Array] = None, segments=None, causal: bool = False,
              scale: float, dropout=None, index=None, prefix: Optional[Array] = None,
              strategy: str = "allgather", axis: str = "context",
              load_balance: bool = False) -> Array:
    """context_parallel.attention's function on the splash kernel.

    q [b, t, heads, d]; k, v [b, t, kv_heads, d]; segments (q_segments, k_segments) [b, t],
    0 = padding (which real tokens never see); `index` [t] each token's original position in
    the current order (None: natural); `load_balance`: a traced `index` is
    load_balance_order(t, context) (the model's order when model.context_load_balance is on;
    the kernel's block tables need the order at trace time). `mask` is not read. The mesh is
    the abstract mesh in context: batch over the logical rules' "batch" axes, heads over
    "heads", sequence over `axis`. Returns [b, t, heads, d] in q's dtype, sharded like q.
    """
    del mask
    if bias is not None or dropout is not None or prefix is not None:
        raise ValueError("splash under context parallelism takes no bias, no dropout and no "
                         "prefix-LM prefix")
    if segments is None:
        raise ValueError("splash under context parallelism needs the segment ids")
    if strategy != "allgather":
        raise ValueError(f"splash under context parallelism all-gathers K/V; strategy "
                         f"{strategy!r} runs on context_parallel's XLA op")
    b, t, heads = q.shape[:3]
    kv_heads = k.shape[2]
    if k.shape[1] != t:
        raise ValueError(f"context-parallel attention is self-attention: {k.shape[1]} keys "
                         f"for {t} queries")
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else mesh.shape.get(axis, 1)
    if t % shards:
        raise ConfigError(f"train.seq_len={t} is not divisible by mesh.context={shards}: "
                          f"every context shard holds an equal piece of the sequence")
    local = t // shards
    if local % splash.LANES:
        _warn_fallback(local)
        return cp.attention(q, k, v, segments=segments, causal=causal, scale=scale,
                            index=index, axis=axis)
    order = static_order(index, t, shards, causal, load_balance)
    runs = None if order is None else natural_runs(order)
    # Query blocks inside one load-balanced chunk keep the skipping of whole tiles even.
    chunk = local if order is None else math.gcd(*(n for _, n in runs))
    bq = splash._block(chunk) if chunk % splash.LANES == 0 else splash._block(local)
    interpret = platform.platform() != "tpu"  # compiled for a TPU mesh even from a CPU host
    if interpret:
        splash._warn_interpreted(platform.platform())

    q = (q * scale).astype(q.dtype)  # the kernel has no scale argument
    q_segments, k_segments = (s.astype(jnp.int32) for s in segments)
    batch_axes = head_axes = None
    if not mesh.empty:
        batch_axes = cp._without(splash._mesh_axes("batch", b, mesh), axis)
        head_axes = cp._without(splash._mesh_axes("heads", heads, mesh), axis)
    n_head_shards = math.prod(mesh.shape[a] for a in head_axes or ())
    if kv_heads % n_head_shards and kv_heads != 1:
        # Key/value heads that cannot follow the query heads' split: one per query head.
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
        kv_heads = heads
    kv_axes = head_axes if kv_heads % n_head_shards == 0 and kv_heads > 1 else None
    local_heads = heads // n_head_shards
    local_kv = kv_heads // math.prod(mesh.shape[a] for a in kv_axes or ())
    mqa = local_kv != local_heads
    kernel, kernel_shards = _kernel(order, t, shards,
                                    local_heads // local_kv if mqa else local_heads, causal,
                                    mqa, bq, interpret)
    gather = axis if shards > 1 else None

    def run(kernel, q, k, v, q_seg, k_seg):
        if gather is not None:
            k, v, k_seg = (jax.lax.all_gather(x, gather, axis=1, tiled=True)
                           for x in (k, v, k_seg))
        k, v, k_seg = (_unpermute(x, runs, 1) for x in (k, v, k_seg))
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        return splash.run_kernel(kernel, q, k, v, q_seg, k_seg).transpose(0, 2, 1, 3)

    args = (kernel, q, k, v, q_segments, k_segments)
    if mesh.empty:
        return run(*args)
    qo = jax.P(batch_axes, gather, head_axes, None)
    kvs = jax.P(batch_axes, gather, kv_axes, None)
    tok = jax.P(batch_axes, gather)
    kernel_spec = kernel.manual_sharding_spec(
        jax.sharding.NamedSharding(mesh, jax.P(None, gather if kernel_shards > 1 else None)))
    return jax.shard_map(run, mesh=mesh, in_specs=(kernel_spec, qo, kvs, kvs, tok, tok),
                         out_specs=qo, check_vma=False)(*args)
