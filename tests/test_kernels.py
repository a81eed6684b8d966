"""model.kernels: the CPU custom-VJP ops (models/ops/cpu.py, blockwise.py) give the same
outputs and gradients as XLA's own autodiff of the reference math (models/ops/reference.py),
op by op on random inputs; the blockwise attention op also against numpy, with every mask the
model builds; ops.select picks them. Whole models of every family: tests/test_kernels_models.py
(float32) and tests/test_kernels_bf16.py (split so that pytest-xdist spreads them)."""
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, model_config
from llmjax.models import ops
from llmjax.models.attention import make_mask
from llmjax.models.layers import Dense, Norm
from llmjax.models.ops import blockwise, cpu, reference

IMPLS = {"xla": reference.attention, "cpu_custom_vjp": blockwise.attention}

from helpers import close_trees as _close_trees


def test_attention_kernel_gqa_bias_mask():
    rng = np.random.default_rng(1)
    b, t, h, kh, d = 2, 12, 6, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((b, h, t, t)), jnp.float32)
    seg = jnp.asarray([[1] * 8 + [2] * 4, [1] * 10 + [0] * 2], jnp.int32)
    mask = make_mask(seg, seg, causal=True)
    w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    for m, bb in [(mask, bias), (mask, None), (None, bias), (None, None)]:
        def f(impl, q, k, v, bb):
            return jnp.sum(IMPLS[impl](q, k, v, mask=m, bias=bb, scale=0.3) * w)
        args = (q, k, v) + ((bb,) if bb is not None else (None,))
        argnums = (1, 2, 3, 4) if bb is not None else (1, 2, 3)
        ref = jax.grad(f, argnums)("xla", *args)
        got = jax.grad(f, argnums)("cpu_custom_vjp", *args)
        np.testing.assert_allclose(f("cpu_custom_vjp", *args), f("xla", *args), rtol=1e-5)
        for r, g in zip(ref, got):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("in_dims,use_bias", [(1, True), (2, False), (1, False)])
def test_dense_kernel(in_dims, use_bias):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 4, 6)), jnp.float32)
    outs = []
    for kernels in ("xla", "cpu_custom_vjp"):
        layer = Dense((7, 3), ("a", "b", "c"), in_dims=in_dims, use_bias=use_bias,
                      kernels=kernels)
        variables = layer.init(jax.random.key(0), x)
        f = lambda p, x: jnp.sum(jnp.cos(layer.apply(p, x)))  # noqa: E731
        outs.append((layer.apply(variables, x), jax.grad(f, (0, 1))(variables, x)))
    np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5)
    _close_trees(outs[0][1], outs[1][1], 1e-5)


@pytest.mark.parametrize("kind,use_bias", [("layernorm", True), ("layernorm", False),
                                           ("rmsnorm", False)])
def test_norm_kernel(kind, use_bias):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 9, 16)) * 3 + 1, jnp.float32)
    outs = []
    for kernels in ("xla", "cpu_custom_vjp"):
        layer = Norm(kind=kind, use_bias=use_bias, kernels=kernels)
        variables = layer.init(jax.random.key(0), x)
        variables = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape),
                                 variables)
        f = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x) * 2))  # noqa: E731
        outs.append((layer.apply(variables, x), jax.grad(f, (0, 1))(variables, x)))
    np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5)
    _close_trees(outs[0][1], outs[1][1], 1e-5)


def test_switch_resolution_and_validation():
    assert ops.resolve_kernels("xla") == "xla"
    expected = "cpu_custom_vjp" if jax.default_backend() == "cpu" else "xla"
    assert ops.resolve_kernels("auto") == expected
    assert model_config("gpt-tiny").kernels == "auto"
    with pytest.raises(ConfigError, match="model.kernels"):
        model_config("gpt-tiny", kernels="fast")


# The blockwise attention op (ops/blockwise.py): query blocks smaller than the sequence, so
# causal key skipping, block edges and a ragged last block are all exercised.

def _numpy_attention(q, k, v, mask, bias, scale):
    """float64 softmax(q k^T * scale + bias, masked with -1e30) v, key/value heads shared."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if mask is not None:
        s = np.where(np.asarray(mask), s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def _attention_case(rng, t=20, s=20, heads=4, kv_heads=2, d=8, bias=False):
    q = jnp.asarray(rng.standard_normal((2, t, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, s, kv_heads, d)), jnp.float32)
            for _ in range(2))
    b = jnp.asarray(rng.standard_normal((2, heads, t, s)), jnp.float32) if bias else None
    return q, k, v, b


@pytest.mark.parametrize("case", ["causal_packed_padding", "causal_no_mask", "bidirectional",
                                  "t5_bias_causal", "prefix_tuning_keys", "prompt_visible"])
def test_blockwise_attention_matches_reference_and_numpy(case):
    """Forward against float64 numpy and the reference op; gradients (q, k, v, bias) against
    the reference's autodiff, for every mask the model builds."""
    rng = np.random.default_rng(6)
    t, n = 20, 3
    seg = jnp.asarray([[1] * 9 + [2] * 8 + [3] * 3, [1] * 14 + [0] * 6], jnp.int32)
    q, k, v, bias = _attention_case(rng, bias=case == "t5_bias_causal",
                                    s=t + n if case == "prefix_tuning_keys" else t)
    causal, mask = True, make_mask(seg, seg, causal=True)
    if case == "causal_no_mask":
        mask = None
    elif case == "bidirectional":
        causal, mask = False, make_mask(seg, seg, causal=False)
    elif case == "prefix_tuning_keys":  # n learned keys before the sequence, seen by all
        sees = jnp.any(mask, axis=-1, keepdims=True)
        mask = jnp.concatenate([jnp.broadcast_to(sees, mask.shape[:3] + (n,)), mask], -1)
    elif case == "prompt_visible":  # soft prompt: segment -1 first, seen by every token
        seg = jnp.concatenate([jnp.full((2, n), -1, jnp.int32), seg[:, :t - n]], axis=1)
        mask = make_mask(seg, seg, causal=True, visible=n)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    dense_mask = mask if mask is not None else reference.causal_mask(t, k.shape[1])

    got = jax.jit(lambda q, k, v, b: blockwise.attention(q, k, v, mask=mask, bias=b, scale=0.4,
                                                         causal=causal, block=8))(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, dense_mask, bias, 0.4),
                               atol=2e-6, rtol=1e-5)

    def loss(fn, q, k, v, bias):
        return jnp.sum(fn(q, k, v, mask=mask, bias=bias, scale=0.4, causal=causal) * w)

    argnums = (1, 2, 3, 4) if bias is not None else (1, 2, 3)
    block8 = lambda *a, **kw: blockwise.attention(*a, block=8, **kw)  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums), static_argnums=0)
    ref, got = grad(reference.attention, q, k, v, bias), grad(block8, q, k, v, bias)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-4)


def test_blockwise_attention_never_holds_the_full_score_matrix():
    """No float array of the forward + backward has the [t, s] trailing shape of the full
    scores (the reference's does): only [block, keys] pieces of it exist."""
    rng = np.random.default_rng(7)
    t = 32
    q, k, v, _ = _attention_case(rng, t=t, s=t)
    seg = jnp.ones((2, t), jnp.int32)
    mask = make_mask(seg, seg, causal=True)

    def shapes(fn):
        f = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask=mask, scale=0.3, causal=True)),
                     (0, 1, 2))
        jaxpr = jax.make_jaxpr(f)(q, k, v)
        found = set()

        def walk(jx):
            for eqn in jx.eqns:
                for var in eqn.outvars:
                    aval = var.aval
                    if jnp.issubdtype(aval.dtype, jnp.floating) and aval.shape[-2:] == (t, t):
                        found.add(aval.shape)
                for sub in jax_core.jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jaxpr.jaxpr)
        return found

    assert shapes(reference.attention)  # the check sees the reference's [.., t, s] scores
    assert not shapes(lambda *a, **kw: blockwise.attention(*a, block=8, **kw))


def test_attention_op_selection(monkeypatch):
    """ops.attention_op is the one choice: dropout needs the reference (the only op that
    exposes probabilities), model.kernels picks blockwise on CPU, splash falls back."""
    cpu_cfg = model_config("gpt-tiny", kernels="cpu_custom_vjp")
    assert ops.attention_op(cpu_cfg) is blockwise.attention
    assert ops.attention_op(cpu_cfg, dropout=True) is reference.attention
    assert ops.attention_op(model_config("gpt-tiny", kernels="xla")) is reference.attention
    assert ops.kernels("cpu_custom_vjp").dense is cpu.dense
    assert ops.kernels("xla").norm is reference.norm
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    tpu_cfg = model_config("llama-tiny", attention_impl="auto")
    assert ops.attention_op(tpu_cfg).__module__ == "llmjax.models.ops.splash"
    for situation in ("decode", "cross", "prefix_lm"):
        assert ops.attention_op(tpu_cfg, **{situation: True}) is reference.attention
    with pytest.raises(ConfigError, match="prefix-LM"):
        ops.attention_op(model_config("llama-tiny", attention_impl="splash"), prefix_lm=True)
