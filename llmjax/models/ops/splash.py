"""Pallas splash attention (TPU flash attention with block-sparse masks): the attention op.

The kernel (jax.experimental.pallas.ops.tpu.splash_attention) works on one example:
q [heads, t, d], k/v [kv_heads or 1, s, d], a static mask (causal or full) and
per-token segment ids; it never materialises the [t, s] scores and skips the
blocks a causal mask hides. This module adapts it to the model's layout
([b, t, heads, d]), batch (vmap), grouped-query attention (the MQA kernel per
key/value head), sequence lengths that are not a multiple of its 128-wide blocks
(padding with a segment of its own) and device meshes (shard_map over the batch
and head axes of the logical rules, so every device runs the kernel on its shard
with no gathering).

What the kernel cannot express is refused (`unsupported`): an additive bias
(T5's relative positions), the prefix-LM mask, soft prompts and prefix tuning.
Off TPU the kernel runs in Pallas interpret mode: correct, slow, for tests.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from llmjax.config import ModelConfig, splash_unsupported
from llmjax.errors import ConfigError
from llmjax.models.ops import platform

log = logging.getLogger(__name__)
Array = jax.Array
LANES = 128  # the kernel's block sizes must be multiples of this
PAD_SEGMENT = -(2 ** 30)  # segment of the positions added to reach a block multiple


def unsupported(cfg: ModelConfig) -> Optional[str]:
    """Why this model's attention cannot run on the splash kernel (None: it can). The list
    lives in llmjax.config (splash_unsupported) so that config validation imports no kernel."""
    return splash_unsupported(cfg)


def check(cfg: ModelConfig) -> None:
    """ConfigError when model.attention_impl=splash is asked of a model it cannot run."""
    if reason := unsupported(cfg):
        raise ConfigError(f"model.attention_impl=splash cannot run this model: {reason}; "
                          f"use model.attention_impl=auto or xla")


def _block(length: int) -> int:
    """Largest of 512/256/128 dividing `length` (a multiple of 128): fewer grid steps."""
    return next(b for b in (512, 256, LANES) if length % b == 0)


def _kernel(heads: int, q_len: int, kv_len: int, causal: bool, mqa: bool, interpret: bool):
    """The kernel for one example, from static shapes. Its block tables are built in numpy
    at trace time and cached by jax per mask (first build: 0.1 s at seq 2048, 4 s at 32k
    x 64 heads; later traces reuse them)."""
    shape = (q_len, kv_len)
    mask = sa.MultiHeadMask([sa.CausalMask(shape) if causal else sa.FullMask(shape)] * heads)
    sizes = block_sizes(_block(q_len), _block(kv_len))
    make = sa.make_splash_mqa_single_device if mqa else sa.make_splash_mha_single_device
    return make(mask, block_sizes=sizes, interpret=interpret)


def block_sizes(bq: int, bkv: int) -> sa.BlockSizes:
    """The kernel's blocks, forward and backward: `bq` queries x `bkv` keys."""
    return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                         block_q_dq=bq, block_kv_dq=bkv)


@functools.cache
def _warn_interpreted(backend: str) -> None:
    log.warning("model.attention_impl=splash on %s runs the TPU kernel in Pallas interpret "
                "mode: correct but very slow; use attention_impl=auto or xla off TPU", backend)


def _pad_to_lanes(x: Array, axis: int, value) -> Array:
    extra = -x.shape[axis] % LANES
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _per_device(q: Array, k: Array, v: Array, q_seg: Array, k_seg: Array, *,
                causal: bool, interpret: bool) -> Array:
    """q [b, h, t, d], k/v [b, kh, s, d], segments [b, t] / [b, s] -> [b, h, t, d]."""
    h, t = q.shape[1], q.shape[2]
    kh = k.shape[1]
    # Added positions form their own segment: real queries never see them, and each added
    # query sees at least itself under a causal mask (no empty softmax row).
    q, k, v = (_pad_to_lanes(x, 2, 0) for x in (q, k, v))
    q_seg, k_seg = (_pad_to_lanes(s, 1, PAD_SEGMENT) for s in (q_seg, k_seg))
    t_pad, s_pad = q.shape[2], k.shape[2]
    kernel = _kernel(h if kh == h else h // kh, t_pad, s_pad, causal, kh != h, interpret)
    return run_kernel(kernel, q, k, v, q_seg, k_seg)[:, :, :t]


def run_kernel(kernel, q: Array, k: Array, v: Array, q_seg: Array, k_seg: Array) -> Array:
    """A kernel over a batch: q [b, h, t, d], k/v [b, kh, s, d], segments [b, t] / [b, s]
    -> [b, h, t, d]. kh == h: `kernel` is the MHA kernel of h heads; else the MQA kernel of
    h / kh heads, run once per key/value head (each serves a group of query heads)."""
    b, h, t, d = q.shape
    kh = k.shape[1]
    if kh == h:
        one = lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids)  # noqa: E731
    else:
        group = h // kh

        def one(q, k, v, ids):
            q = q.reshape(kh, group, t, d)
            out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)
            return out.reshape(h, t, d)
    return jax.vmap(lambda q, k, v, qs, ks: one(q, k, v, sa.SegmentIds(qs, ks)))(
        q, k, v, q_seg, k_seg)


def _mesh_axes(name: str, size: int, mesh) -> Optional[tuple[str, ...]]:
    """Mesh axes the logical rules give `name`, or None when they don't divide `size`."""
    spec = nn.logical_to_mesh_axes((name,))
    axes = spec[0] if spec is not None and len(spec) else None
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.shape)
    n = math.prod(mesh.shape[a] for a in axes)
    return axes if axes and size % n == 0 else None


def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              bias: Optional[Array] = None, segments=None, causal: bool = False,
              scale: float, dropout=None) -> Array:
    """softmax(q k^T * scale, segment (+ causal) mask) v on the splash kernel.

    q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; segments (q_segments [b, t], k_segments
    [b, s]), 0 = padding, which only padding sees; they and `causal` restate `mask`, which
    the kernel does not read. Returns [b, t, heads, d].
    """
    del mask
    if bias is not None or dropout is not None or segments is None:
        raise ValueError("splash attention takes segment ids, no bias and no dropout")
    q_segments, k_segments = segments
    interpret = platform.platform() != "tpu"  # compiled for a TPU mesh even from a CPU host
    if interpret:
        _warn_interpreted(platform.platform())
    q = (q * scale).astype(q.dtype)  # the kernel has no scale argument
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    q_segments, k_segments = q_segments.astype(jnp.int32), k_segments.astype(jnp.int32)
    run = functools.partial(_per_device, causal=causal, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = run(q, k, v, q_segments, k_segments)
    else:
        heads, kv_heads = q.shape[1], k.shape[1]
        batch_axes = _mesh_axes("batch", q.shape[0], mesh)
        head_axes = _mesh_axes("heads", heads, mesh)
        n_head_shards = math.prod(mesh.shape[a] for a in head_axes or ())
        if kv_heads % n_head_shards and kv_heads != 1:
            # Key/value heads that cannot follow the query heads' split: one per query head.
            k, v = (jnp.repeat(x, heads // kv_heads, axis=1) for x in (k, v))
            kv_heads = heads
        kv_axes = head_axes if kv_heads % n_head_shards == 0 and kv_heads > 1 else None
        qo = jax.P(batch_axes, head_axes, None, None)
        kvs = jax.P(batch_axes, kv_axes, None, None)
        seg = jax.P(batch_axes, None)
        out = jax.shard_map(run, mesh=mesh, in_specs=(qo, kvs, kvs, seg, seg), out_specs=qo,
                            check_vma=False)(q, k, v, q_segments, k_segments)
    return out.transpose(0, 2, 1, 3)
