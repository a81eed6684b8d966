"""model.kernels in bfloat16 (fp32 master weights): whole models of every family close to XLA's
autodiff of the reference math, and the bf16 paths of the CPU ops (float32 whole models and the
other ops: tests/test_kernels_models.py, tests/test_kernels.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import close_trees as _close_trees
from helpers import kernel_outputs_and_grads
from llmjax.models.attention import make_mask
from llmjax.models.ops import blockwise, cpu, reference

IMPLS = {"xla": reference.attention, "cpu_custom_vjp": blockwise.attention}
FAMILIES = ["gpt-tiny", "bert-tiny", "t5-tiny", "palm-tiny", "llama-tiny"]


@pytest.mark.parametrize("preset", FAMILIES)
def test_bf16_mixed_precision_close(preset):
    out_x, g_x = kernel_outputs_and_grads(preset, "xla", "bfloat16")
    out_c, g_c = kernel_outputs_and_grads(preset, "cpu_custom_vjp", "bfloat16")
    np.testing.assert_allclose(np.asarray(out_c["logits"], np.float32),
                               np.asarray(out_x["logits"], np.float32), atol=2e-2)
    _close_trees(g_x, g_c, 3e-2)
    # fp32 master weights: gradients come back in the parameters' dtype
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g_c))


# The bf16 paths: every backward dot is a row-major [m, k] @ [k, n] dot, with transposes
# made physical and residuals stored bit-cast (ops/cpu.py: _t, _tn, _stash).

@pytest.mark.parametrize("n,k,m", [(64, 8, 32), (64, 32, 8)])  # transpose a / transpose b
def test_tn_both_orientations(n, k, m):
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.standard_normal((3, n, k)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((3, n, m)), jnp.bfloat16)
    got = jax.jit(cpu._tn)(a, b)
    ref = np.einsum("bnk,bnm->bkm", np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert got.dtype == jnp.float32 and got.shape == (3, k, m)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-4)


def test_bf16_attention_and_activation_gradients():
    """Long keys (s > 2 d) take the transpose-the-small-side branch in dv and dk."""
    rng = np.random.default_rng(5)
    b, t, h, kh, d = 2, 32, 4, 2, 4
    q, k, v, w = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.bfloat16)
                  for n in (h, kh, kh, h))
    mask = make_mask(jnp.ones((b, t), jnp.int32), jnp.ones((b, t), jnp.int32), causal=True)

    def attn(impl, q, k, v):
        out = IMPLS[impl](q, k, v, mask=mask, scale=0.5)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))

    ref = jax.jit(jax.grad(attn, (1, 2, 3)), static_argnums=0)("xla", q, k, v)
    got = jax.jit(jax.grad(attn, (1, 2, 3)), static_argnums=0)("cpu_custom_vjp", q, k, v)
    assert [g.dtype for g in got] == [jnp.bfloat16] * 3
    _close_trees(ref, got, 2e-2)

    x, y = (jnp.asarray(rng.standard_normal((16, 24)), jnp.bfloat16) for _ in range(2))
    gelu = lambda z: jax.nn.gelu(z, approximate=True)  # noqa: E731
    for gate in (None, y):
        def plain(x, gate):
            h = gelu(x.astype(jnp.float32))
            return h if gate is None else h * gate.astype(jnp.float32)

        def kernel(x, gate):
            return cpu.activation(gelu, x, gate, dtype=jnp.float32)

        argnums = (0,) if gate is None else (0, 1)
        np.testing.assert_allclose(np.asarray(kernel(x, gate)), np.asarray(plain(x, gate)),
                                   rtol=1e-6)
        loss = lambda f: lambda x, gate: jnp.sum(jnp.sin(f(x, gate)))  # noqa: E731
        ref = jax.grad(loss(plain), argnums)(x, gate)
        got = jax.jit(jax.grad(loss(kernel), argnums))(x, gate)
        assert [g.dtype for g in got] == [jnp.bfloat16] * len(argnums)
        _close_trees(ref, got, 1e-2)
