"""The splash kernel under context parallelism (llmjax/models/ops/context_splash.py): outputs
and gradients equal XLA's dense attention under make_mask (Pallas interpret mode on 8 CPU
devices: tiny shapes), with and without the load-balanced order, packed and padded rows, GQA,
batch and heads sharded beside the context axis; what it cannot run is a ValueError; and it
compiles for a real TPU topology (libtpu, no TPU) to the Mosaic kernel with no [t, t] array."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.models.attention import make_mask
from llmjax.models.ops import context_parallel as cp
from llmjax.models.ops import context_splash as cs
from llmjax.models.ops import reference

T, HEADS, D = 512, 2, 128  # four 128-wide kernel blocks; the kernel's head size
RULES = [("batch", "data"), ("heads", "tensor")]


def _mesh(**axes):
    names = tuple(axes)
    n = int(np.prod(list(axes.values())))
    return jax.make_mesh(tuple(axes.values()), names, devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _inputs(b, kv_heads):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, T, HEADS, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, T, kv_heads, D)), jnp.float32)
            for _ in range(2))
    segments = np.ones((b, T), np.int32)  # packed documents, then right padding (0)
    segments[:, 300:] = 2
    segments[:, 450:] = 0
    segments[1:, 200:300] = 3
    probe = jnp.asarray(rng.standard_normal((b, T, HEADS, D)), jnp.float32)
    return q, k, v, jnp.asarray(segments), probe


def _outputs_and_grads(attend, q, k, v, segments, probe):
    """Output and d(loss)/d(q, k, v) over the real (non-padding) queries: padding queries
    differ by design (XLA: uniform over all keys; splash: the padding segment) and reach no
    real position."""
    keep = (segments != 0)[..., None, None]

    def loss(q, k, v):
        out = attend(q, k, v) * keep
        return jnp.sum(out * probe), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    return (out,) + grads


@pytest.mark.parametrize("context,causal,balance,b,kv_heads,other", [
    (2, True, None, 2, 1, {"data": 2}),  # MQA kernel per key/value head; batch over data
    (2, True, "traced", 1, 2, {"tensor": 2}),  # the model's traced order; heads over tensor
    (4, True, "traced", 1, 2, {}),  # chunks of 64: tiles straddle two chunks
    (4, True, None, 1, 1, {}),
    (4, False, "concrete", 1, 2, {}),  # no causal mask: the order does not matter
])
def test_matches_dense_attention(context, causal, balance, b, kv_heads, other):
    q, k, v, segments, probe = _inputs(b, kv_heads)
    scale = D ** -0.5
    want = _outputs_and_grads(
        lambda q, k, v: reference.attention(q, k, v, mask=make_mask(segments, segments, causal),
                                            scale=scale), q, k, v, segments, probe)
    order = None if balance is None else cp.load_balance_order(T, context)
    inverse = None if order is None else np.argsort(order)

    def split(q, k, v):
        # The model's layout: tokens in `order`, its original positions as `index`.
        qo, ko, vo, so = (x if order is None else x[:, order] for x in (q, k, v, segments))
        index = jnp.asarray(order) if balance == "traced" else order  # traced under jit
        with nn.logical_axis_rules(RULES):
            out = cs.attention(qo, ko, vo, segments=(so, so), causal=causal, scale=scale,
                               index=index, load_balance=balance == "traced")
        return out if order is None else out[:, inverse]

    with jax.set_mesh(_mesh(context=context, **other)):
        got = _outputs_and_grads(split, q, k, v, segments, probe)
    for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5,
                                   err_msg=name)


def test_refuses_what_the_kernel_cannot_run():
    q, k, v, segments, _ = _inputs(1, 1)
    common = dict(segments=(segments, segments), causal=True, scale=1.0)
    for extra in ({"bias": jnp.zeros((1, HEADS, T, T))}, {"dropout": lambda p: p},
                  {"prefix": segments > 0}, {"strategy": "ring"}):
        with pytest.raises(ValueError):
            cs.attention(q, k, v, **common, **extra)
    with pytest.raises(ValueError, match="segment ids"):
        cs.attention(q, k, v, causal=True, scale=1.0)
    with jax.set_mesh(_mesh(context=2)), pytest.raises(ValueError, match="load_balance=True"):
        # A traced order the op is not told about: the block tables cannot be built.
        jax.jit(lambda i: cs.attention(q, k, v, **common, index=i))(
            jnp.asarray(cp.load_balance_order(T, 2)))


def test_static_order_and_runs():
    order = cp.load_balance_order(16, 2)  # chunks 0, 3 | 1, 2 of 4 tokens
    assert cs.natural_runs(order) == [(0, 4), (8, 8), (4, 4)]  # chunks 1, 2 are adjacent
    x = np.asarray(order)
    runs = cs.natural_runs(order)
    np.testing.assert_array_equal(np.asarray(cs._unpermute(jnp.asarray(x)[None], runs, 1))[0],
                                  np.arange(16))
    assert cs.static_order(np.arange(16), 16, 2, True, False) is None
    assert cs.static_order(order, 16, 2, False, False) is None  # bidirectional: order-free
    with pytest.raises(ValueError, match="permutation"):
        cs.static_order(np.zeros(16, np.int32), 16, 2, True, False)


def test_short_local_length_runs_the_xla_op(monkeypatch):
    """t / context not a multiple of the kernel's 128-wide blocks: context_parallel's XLA op
    (the same function, tested in test_context_parallel_ops.py) with the same arguments."""
    calls = []
    monkeypatch.setattr(cp, "attention", lambda q, k, v, **kw: calls.append(kw) or q)
    q = jnp.zeros((1, 192, 2, 16))
    segments = jnp.ones((1, 192), jnp.int32)
    with jax.set_mesh(_mesh(context=2)):
        out = cs.attention(q, q, q, segments=(segments, segments), causal=True, scale=0.25,
                           index=np.arange(192))
    assert out is q and len(calls) == 1
    assert calls[0]["causal"] and calls[0]["scale"] == 0.25 and calls[0]["axis"] == "context"


def test_the_selector_routes_splash_models_under_context_parallelism_here():
    """ops/select.py gives this op to a splash model under context parallelism (all-gather),
    and context_parallel's XLA op to the ring strategy and to prefix-LM masks."""
    from llmjax.config import model_config
    from llmjax.models import ops

    def chosen(prefix_lm=False, **model):
        op = ops.attention_op(model_config("llama-tiny", attention_impl="splash", **model),
                              context_parallel=True, prefix_lm=prefix_lm)
        return getattr(op, "func", op)

    assert chosen() is cs.attention
    assert chosen(context_parallel="ring") is cp.attention
    assert chosen(prefix_lm=True) is cp.attention


def test_train_step_on_a_context_mesh_equals_one_device():
    """One SGD step (lr 1) of llama-tiny (GQA, RoPE, causal, load balanced by default) on
    packed and padded rows of 256 tokens, context 2 with attention_impl=splash (interpret
    mode), equals the single-device XLA step: loss and every parameter."""
    import math

    from helpers import compiled_step, fast_init, sgd_config, to_global
    from llmjax.data.pipeline import make_iterator
    from llmjax.train.experiment import build

    def config(mesh, **model):
        return sgd_config("llama-tiny", "clm", mesh, train={"seq_len": 256, "batch_size": 2},
                          model={"num_heads": 4, "head_dim": 32, **model})

    ref = build(config((1, 1, 1, 1, 1)), devices=jax.devices()[:1])
    batch = next(make_iterator(ref.config.data, ref.objective.batch_kind, 256, 2,
                               vocab_size=ref.config.model.vocab_size))
    segments = np.ones((2, 256), np.int32)
    segments[:, 100:] = 2
    segments[1, 230:] = 0
    positions = np.concatenate([np.arange(100), np.arange(156)])[None].repeat(2, 0)
    batch = {**batch, "segment_ids": segments, "positions": positions.astype(np.int32),
             "tokens": np.where(segments > 0, batch["tokens"], 0).astype(np.int32)}
    init = fast_init(ref)
    impl = jax.random.key_impl(init.rng)
    init = jax.device_get(init.replace(rng=jax.random.key_data(init.rng)))

    def step(mesh, **model):
        exp = build(config(mesh, **model), devices=jax.devices()[:math.prod(mesh)])
        shardings = exp.state_shardings()
        state = jax.device_put(init, shardings)
        state = state.replace(rng=jax.random.wrap_key_data(state.rng, impl=impl))
        new, metrics = compiled_step(exp, shardings, batch)(
            state, to_global(batch, exp.batch_shardings(batch)))
        return jax.device_get(new.params), jax.device_get(metrics)

    want, want_metrics = step((1, 1, 1, 1, 1))
    got, metrics = step((1, 1, 1, 1, 2), attention_impl="splash")
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-5)


def _libtpu() -> bool:
    from llmjax.plan import aot
    return aot.libtpu_available()


@pytest.mark.skipif(not _libtpu(), reason="libtpu is not installed (pip install "
                    "'llmjax[tpu]'); CI installs it")
def test_compiles_for_tpu_with_the_mosaic_kernel():
    """A v5e 2x2 (data 2 x context 2), load-balanced causal GQA attention's gradient in bf16,
    compiled by the real TPU compiler: the splash kernels (forward, dq, dkv) as Mosaic custom
    calls, K/V all-gathered and their gradients reduce-scattered, and no [t, t] or
    [t / context, t] array anywhere."""
    from llmjax.plan.topology import parse

    devices = np.array(parse("v5e:2x2").devices()).reshape(2, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "context"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    b, t, heads, kv_heads, d, context = 2, 4096, 4, 2, 128, 2
    order = cp.load_balance_order(t, context)

    def loss(q, k, v, segments):
        with nn.logical_axis_rules(RULES):
            out = cs.attention(q, k, v, segments=(segments, segments), causal=True,
                               scale=d ** -0.5, index=jnp.asarray(order), load_balance=True)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    def arg(shape, dtype):
        spec = jax.P("data", "context")
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    args = (arg((b, t, heads, d), jnp.bfloat16), arg((b, t, kv_heads, d), jnp.bfloat16),
            arg((b, t, kv_heads, d), jnp.bfloat16), arg((b, t), jnp.int32))
    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 3
    for kernel in ("splash_mqa_fwd", "splash_mqa_dq", "splash_mqa_dkv"):
        assert kernel in text
    assert "all-gather" in text and "reduce-scatter" in text
    for rows in (t, t // context):
        assert not re.search(rf"\[[\d,]*\b{rows},{t}\b", text), f"a [{rows}, {t}] array"
