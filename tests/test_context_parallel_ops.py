"""Context-parallel attention (llmjax/models/ops/context_parallel.py): with the sequence
sharded over a `context` mesh axis of 2, 4 and 8 devices, both strategies (all-gather K/V,
ring) give the one-device reference attention under the model's dense mask (make_mask):
outputs and q/k/v gradients within 1e-5 in f32, for causal, packed (+ padding), prefix-LM and
bidirectional masks, in the original order and load-balanced (zigzag) order. No device holds
a [t_local, t] score matrix; the compiled temporaries at t=4096 fall with the context size."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.models.attention import make_mask
from llmjax.models.ops import context_parallel as cp
from llmjax.models.ops import reference
from llmjax.parallel import DEFAULT_RULES

B, T, H, KH, D = 2, 64, 4, 2, 8
SCALE = 0.3
BLOCK = 8  # several query and key tiles per device: the online softmax and tile skipping run
# name: (causal, with a prefix-LM prefix). Row 0 of the batch is one document (plain causal),
# row 1 two packed documents and right padding: each case covers both.
VARIANTS = {"causal_and_packed": (True, False), "prefix_lm": (True, True),
            "bidirectional": (False, False)}
MESHES = {2: (2, 2, 2), 4: (2, 4, 1), 8: (1, 8, 1)}  # (data, context, tensor) per context size


@functools.cache
def _case():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, T, KH, D)).astype(np.float32) for _ in range(2))
    seg = np.asarray([[1] * T, [1] * 20 + [2] * 30 + [0] * 14], np.int32)
    pos = np.arange(T)
    prefix = np.stack([pos < 10, (pos < 8) | ((pos >= 20) & (pos < 26))])
    keep = (seg != 0)[..., None, None]  # padding queries' outputs differ by design
    w = rng.standard_normal(q.shape).astype(np.float32) * keep
    return dict(q=q, k=k, v=v, seg=seg, prefix=prefix, w=w)


def _outputs_and_grads(op, q, k, v, seg, prefix, w):
    """{variant: (output, (dq, dk, dv))} of the loss sum(out * w) (w is 0 on padding rows)."""
    out = {}
    for name, (causal, with_prefix) in VARIANTS.items():
        p = prefix if with_prefix else None

        def loss(q, k, v):
            o = op(q, k, v, seg=seg, causal=causal, prefix=p)
            return jnp.sum(o * w), o

        grads, o = jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        out[name] = (o, grads)
    return out


@functools.cache
def _reference():
    """One device, the dense mask of the model."""
    def op(q, k, v, *, seg, causal, prefix):
        mask = make_mask(seg, seg, causal, prefix)
        return reference.attention(q, k, v, mask=mask, causal=causal, scale=SCALE)
    return jax.device_get(jax.jit(functools.partial(_outputs_and_grads, op))(**_case()))


@functools.cache
def _sharded(strategy):
    """One jitted function per strategy (jax caches one program per mesh)."""
    def op(q, k, v, *, seg, causal, prefix, index):
        return cp.attention(q, k, v, segments=(seg, seg), causal=causal, scale=SCALE,
                            index=index, prefix=prefix, strategy=strategy, block=BLOCK)

    def run(q, k, v, seg, prefix, w, index):
        return _outputs_and_grads(functools.partial(op, index=index), q, k, v, seg, prefix, w)
    return jax.jit(run)


def _mesh(shape, names=("data", "context", "tensor")):
    return jax.sharding.Mesh(np.asarray(jax.devices()[:np.prod(shape)]).reshape(shape), names)


def _run_sharded(strategy, context, balanced):
    """The sharded op's outputs and gradients, back in the original token order."""
    case = _case()
    order = cp.load_balance_order(T, context) if balanced else np.arange(T, dtype=np.int32)
    back = np.argsort(order)
    args = {name: x[:, order] for name, x in case.items()}  # tokens, segments, prefix moved
    with nn.logical_axis_rules(DEFAULT_RULES), jax.set_mesh(_mesh(MESHES[context])):
        got = _sharded(strategy)(**args, index=jnp.asarray(order))
    return jax.tree.map(lambda x: np.asarray(x)[:, back], got)


@pytest.mark.parametrize("balanced", [False, True], ids=["in_order", "load_balanced"])
@pytest.mark.parametrize("context", [2, 4, 8])
@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_equals_one_device_attention(strategy, context, balanced):
    keep = (_case()["seg"] != 0)[..., None, None]
    got, ref = _run_sharded(strategy, context, balanced), _reference()
    for name in VARIANTS:
        (out, grads), (ref_out, ref_grads) = got[name], ref[name]
        np.testing.assert_allclose(out * keep, ref_out * keep, atol=1e-5, rtol=1e-5,
                                   err_msg=f"{name} output")
        assert np.all(out[~keep[..., 0, 0]] == 0)  # padding queries see nothing
        for which, g, r in zip("qkv", grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"{name} d{which}")


def test_no_context_axis_no_mesh_and_bf16():
    """Without a mesh (f32 and bf16, whose softmax statistics stay f32), and on a mesh without a
    context axis (heads over 4 devices: the 2 key/value heads are repeated to follow them)."""
    case = _case()
    q, k, v, seg, prefix = (jnp.asarray(case[n]) for n in ("q", "k", "v", "seg", "prefix"))
    keep = (seg != 0)[..., None, None]
    ref = jax.jit(lambda q, k, v: reference.attention(
        q, k, v, mask=make_mask(seg, seg, True, prefix), causal=True, scale=SCALE))(q, k, v) * keep

    def op(q, k, v):
        return cp.attention(q, k, v, segments=(seg, seg), causal=True, scale=SCALE,
                            prefix=prefix, strategy="ring")

    both = jax.jit(lambda q, k, v: (op(q, k, v), op(*(x.astype(jnp.bfloat16) for x in (q, k, v)))))
    full, low = both(q, k, v)
    np.testing.assert_allclose(full * keep, ref, atol=1e-5, rtol=1e-5)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32) * keep, ref, atol=3e-2)
    with nn.logical_axis_rules(DEFAULT_RULES), jax.set_mesh(_mesh((2, 4), ("data", "tensor"))):
        np.testing.assert_allclose(jax.jit(op)(q, k, v) * keep, ref, atol=1e-5, rtol=1e-5)


def _causal_pairs_per_shard(order: np.ndarray, shards: int) -> list[int]:
    """Visible (query, key) pairs of a causal mask each shard's queries have."""
    per = [int(np.sum(order[q] >= order)) for q in range(len(order))]  # keys at or before
    return [sum(c) for c in np.split(np.asarray(per), shards)]


def test_load_balance_order():
    for shards in (1, 2, 4, 8):
        order = cp.load_balance_order(64, shards)
        assert sorted(order.tolist()) == list(range(64))
        work = _causal_pairs_per_shard(order, shards)
        assert len(set(work)) == 1, work  # equal causal work on every shard
    assert cp.load_balance_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    unbalanced = _causal_pairs_per_shard(np.arange(64), 4)
    assert unbalanced[-1] > 3 * unbalanced[0]  # what it fixes
    with pytest.raises(ConfigError, match=r"train.seq_len=60 .*mesh.context"):
        cp.load_balance_order(60, 4)
    with pytest.raises(ConfigError, match="mesh.context=0"):
        cp.load_balance_order(64, 0)


def test_refusals():
    x = jnp.zeros((2, 8, 2, 4))
    seg = jnp.ones((2, 8), jnp.int32)
    kw = dict(segments=(seg, seg), causal=True, scale=1.0)
    with pytest.raises(ValueError, match="no bias"):
        cp.attention(x, x, x, bias=jnp.zeros((2, 2, 8, 8)), **kw)
    with pytest.raises(ValueError, match="no bias and no dropout"):
        cp.attention(x, x, x, dropout=lambda p: p, **kw)
    with pytest.raises(ConfigError, match="strategy 'tree'"):
        cp.attention(x, x, x, strategy="tree", **kw)
    with jax.set_mesh(_mesh((1, 8, 1))):
        with pytest.raises(ConfigError, match=r"train.seq_len=12 .*mesh.context=8"):
            cp.attention(*(jnp.zeros((2, 12, 2, 4)),) * 3, segments=(seg, seg), causal=True,
                         scale=1.0)


def _compiled(strategy, context, t, *, b=1, heads=4, kv_heads=2, d=64, fn=None):
    """The compiled forward + backward of one attention call on a context-only mesh."""
    mesh = _mesh((context,), ("context",))
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    qs = jax.ShapeDtypeStruct((b, t, heads, d), jnp.float32)
    kvs = jax.ShapeDtypeStruct((b, t, kv_heads, d), jnp.float32)

    def op(q, k, v, seg):
        if fn is not None:
            return fn(q, k, v, seg)
        return cp.attention(q, k, v, segments=(seg, seg), causal=True, scale=0.1,
                            strategy=strategy)

    def loss(q, k, v, seg):
        return jnp.sum(op(q, k, v, seg) ** 2)

    with nn.logical_axis_rules(DEFAULT_RULES), jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss, (0, 1, 2))).lower(qs, kvs, kvs, seg).compile()


def _largest_float_array(compiled) -> int:
    """Elements of the largest f32 array anywhere in the per-device program (fusion
    internals included: an upper bound of what is ever materialised)."""
    shapes = re.findall(r"f32\[([0-9,]+)\]", compiled.as_text())
    return max(int(np.prod([int(n) for n in s.split(",")])) for s in shapes)


def test_memory_falls_with_context_and_no_score_matrix(capsys):
    """Forward + backward at t=4096 (b=1, 4 heads, 2 key/value heads, d=64, f32): no device's
    program has a float array of even a quarter of its [heads, t_local, t] scores (the dense
    reference's has the whole [heads, t, t]: the check sees them); memory_analysis's
    temporaries per device (the table is printed) are a small fraction of the dense op's and
    fall with the context size: the [heads, 512, 512] score tiles are fixed, the local
    queries, outputs and gradients shrink as 1/context (the ring's K/V chunks too; the
    all-gather holds all K/V while it runs)."""
    t, heads = 4096, 4

    def dense(q, k, v, seg):
        return reference.attention(q, k, v, mask=make_mask(seg, seg, True), causal=True,
                                   scale=0.1)

    programs = {"dense reference": {1: _compiled(None, 1, t, fn=dense)}}
    assert _largest_float_array(programs["dense reference"][1]) >= heads * t * t
    # With one context shard both strategies are the same program (no communication).
    alone = _compiled("ring", 1, t)
    for strategy in cp.STRATEGIES:
        programs[strategy] = {1: alone, **{c: _compiled(strategy, c, t) for c in (2, 4, 8)}}
        for c, compiled in programs[strategy].items():
            assert _largest_float_array(compiled) < heads * (t // c) * t // 4, (strategy, c)
    temp = {name: {c: x.memory_analysis().temp_size_in_bytes for c, x in row.items()}
            for name, row in programs.items()}
    with capsys.disabled():
        print(f"\ncompiled temporaries per device, MiB (t={t}, b=1, 4 heads, 2 kv heads, "
              f"d=64, f32, forward + backward)")
        print("| strategy | " + " | ".join(f"context {c}" for c in (1, 2, 4, 8)) + " |")
        print("|---|---|---|---|---|")
        for name, row in temp.items():
            print(f"| {name} | " + " | ".join(
                f"{row[c] / 2 ** 20:.1f}" if c in row else "" for c in (1, 2, 4, 8)) + " |")
    for strategy in cp.STRATEGIES:
        row = temp[strategy]
        assert max(row.values()) < temp["dense reference"][1] / 20, row  # no [t, t] term
        assert row[8] < row[4] < row[1], row  # the [t / context] terms fall
    assert temp["ring"][8] < temp["ring"][1] / 2  # allgather also holds all K/V (t terms)


def test_axes_the_inputs_do_not_use_and_mqa():
    """Batch 1 and 3 query heads on a (data 2, context 2, tensor 2) mesh: the data and tensor
    axes shard nothing (the inputs are replicated over them) and one key/value head serves all
    (MQA); gradients still equal the reference's (the shard_map transposes are right)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 32, 3, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 32, 1, 8)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    seg = jnp.asarray([[1] * 12 + [2] * 20], jnp.int32)

    def grads(op):
        return jax.grad(lambda q, k, v: jnp.sum(op(q, k, v) * w), (0, 1, 2))(q, k, v)

    def dense(q, k, v):
        return reference.attention(q, k, v, mask=make_mask(seg, seg, True), causal=True,
                                   scale=SCALE)

    ops = [functools.partial(cp.attention, segments=(seg, seg), causal=True, scale=SCALE,
                             strategy=s, block=4) for s in cp.STRATEGIES]
    with nn.logical_axis_rules(DEFAULT_RULES), jax.set_mesh(_mesh((2, 2, 2))):
        ref, *got = jax.jit(lambda: [grads(op) for op in [dense] + ops])()
    for strategy, g in zip(cp.STRATEGIES, got):
        for which, a, r in zip("qkv", g, ref):
            np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5, err_msg=f"{strategy} d{which}")
