"""Mixture of experts (issue 17): the two expert computations agree, router losses match
their formulas, bad configs name the key, presets count exactly. Meshes and the CLI run:
tests/test_moe_sharded.py."""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, from_dict
from llmjax.models.moe import MoeMlp, apply_collecting, balance_loss, route, z_loss
from llmjax.objectives import build as build_objective
from helpers import host

E, K = 8, 2


def layer_cfg(**kw):
    base = {"preset": "moe-tiny", "d_model": 16, "expert_d_ff": 24, "num_experts": E,
            "experts_per_token": K, **kw}
    return from_dict({"model": base}).model


@pytest.fixture(scope="module")
def layer_inputs():
    x = jax.random.normal(jax.random.key(1), (3, 10, 16), jnp.float32)
    valid = jnp.ones((3, 10), bool).at[2, 7:].set(False)  # padding is routed nowhere
    params = init_layer(layer_cfg(), x, valid)
    params = jax.tree.map(lambda p: p * 10.0 if p.shape == (16, E) else p, params)  # sharp router
    return x, valid, params


def init_layer(cfg, x, valid):
    return nn.unbox(jax.jit(lambda: MoeMlp(cfg).init(jax.random.key(0), x, valid))()["params"])


def run_layer(cfg, params, x, valid):
    """(y, d loss / d params, d loss / d x, dropped) of sum(sin(y))."""
    def loss(p, x):
        y, state = MoeMlp(cfg).apply({"params": p}, x, valid, mutable=["router"])
        return jnp.sum(jnp.sin(y)), (y, state["router"]["dropped"][0])
    (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    return y, grads, dropped


def test_dense_with_full_capacity_equals_dropless(layer_inputs):
    x, valid, params = layer_inputs
    y_a, g_a, dropped_a = run_layer(layer_cfg(moe_impl="dense", capacity_factor=E / K),
                                    params, x, valid)
    y_b, g_b, dropped_b = run_layer(layer_cfg(moe_impl="dropless"), params, x, valid)
    assert float(dropped_a) == 0 and float(dropped_b) == 0
    np.testing.assert_allclose(y_a, y_b, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.max(jnp.abs(y_a[2, 7:]))) == 0.0  # padding rows get no expert output
    # Against a direct per-token loop: y_t = sum_k w_k * expert_{e_k}(x_t).
    p, xn = host(params), np.asarray(x, np.float64)
    logits = xn @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, -1)[..., :K]
    w = np.take_along_axis(probs, ids, -1)
    w /= w.sum(-1, keepdims=True)
    ref = np.zeros_like(xn)
    for b, t in zip(*np.nonzero(np.asarray(valid))):
        for j in range(K):
            e = ids[b, t, j]
            a = xn[b, t] @ p["wi_0"][e]
            h = a / (1 + np.exp(-a)) * (xn[b, t] @ p["wi_1"][e])
            ref[b, t] += w[b, t, j] * (h @ p["wo"][e])
    np.testing.assert_allclose(y_b, ref, atol=1e-5)


def test_dense_dispatch_counts_dropped_tokens(layer_inputs):
    x, valid, params = layer_inputs
    _, _, dropped = run_layer(layer_cfg(moe_impl="dense", capacity_factor=0.5), params, x, valid)
    # Capacity ceil(0.5 * 10 * 2 / 8) = 2 slots per expert and row: 16 of 20 assignments at most.
    assert float(dropped) >= 4 * 3 - 2 * 2  # rows 0, 1 (20 each) and row 2 (14) lose >= 4, 4, 0


def test_shared_expert_is_sigmoid_gated():
    cfg = layer_cfg(moe_shared_d_ff=12)
    x = jax.random.normal(jax.random.key(2), (1, 4, 16))
    valid = jnp.ones((1, 4), bool)
    params = init_layer(cfg, x, valid)
    assert params["shared"]["wi_0"]["kernel"].shape == (16, 12)
    routed = jax.jit(MoeMlp(dataclasses.replace(cfg, moe_shared_d_ff=0)).apply)(
        {"params": {k: v for k, v in params.items() if not k.startswith("shared")}}, x, valid)
    y = jax.jit(MoeMlp(cfg).apply)({"params": params}, x, valid)
    s, xn = host(params), np.asarray(x)
    a = xn @ s["shared"]["wi_0"]["kernel"]
    shared = (a / (1 + np.exp(-a)) * (xn @ s["shared"]["wi_1"]["kernel"])
              ) @ s["shared"]["wo"]["kernel"]
    gate = 1 / (1 + np.exp(-(xn @ s["shared_gate"])))
    np.testing.assert_allclose(y, np.asarray(routed) + gate * shared, atol=1e-5)


def test_uniform_routing_balance_loss_equals_its_weight():
    n = 12
    logits = jnp.zeros((1, n, E))  # uniform router: every expert probability 1/E
    probs, _, ids = route(logits, K, True)
    ids = (jnp.arange(n * K) % E).reshape(1, n, K)  # and a perfectly even top-k
    valid = jnp.ones((1, n), bool)
    assert float(balance_loss(probs, ids, valid, E)) == 1.0
    # Through the objective: the weighted term is exactly the configured weight.
    cfg = from_dict({"model": {"preset": "moe-tiny", "router_balance_weight": 0.25},
                     "objective": {"name": "clm"}})
    obj = build_objective(cfg.objective, cfg.model)
    batch = obj.prepare({"tokens": jnp.ones((1, n), jnp.int32),
                         "segment_ids": jnp.ones((1, n), jnp.int32)}, jax.random.key(0))
    stats = {"balance": balance_loss(probs, ids, valid, E), "z": z_loss(logits, valid)}
    term = obj.loss({"logits": jnp.zeros((1, n, 512)), "router": stats}, batch)["router_balance"]
    count = obj.counts(batch)["router_balance"]
    assert obj.term_weights["router_balance"] * float(term.loss_sum / count) == 0.25


def test_z_loss_matches_its_formula():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, E)) * 3, jnp.float32)
    valid = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    lse = np.log(np.sum(np.exp(np.asarray(logits, np.float64)), -1))
    want = np.sum(lse ** 2 * np.asarray(valid)) / 7
    np.testing.assert_allclose(float(z_loss(logits, valid)), want, rtol=1e-6)
    assert float(z_loss(jnp.zeros((1, 3, E)), jnp.ones((1, 3), bool))) == pytest.approx(
        math.log(E) ** 2, rel=1e-6)


@pytest.mark.parametrize("override, key", [
    ({"model": {"experts_per_token": 9}}, r"model\.experts_per_token=9"),
    ({"model": {"capacity_factor": 0.0}}, r"model\.capacity_factor=0\.0"),
    ({"mesh": {"expert": 3}}, r"mesh\.expert=3 must divide model\.num_experts=8"),
    ({"model": {"moe_every": 2}}, r"model\.moe_every=2"),
    ({"model": {"num_experts": 0}, "mesh": {"expert": 2}}, r"mesh\.expert=2 .*dense"),
])
def test_bad_moe_config_names_the_key(override, key):
    raw = {"model": {"preset": "moe-tiny", **override.get("model", {})},
           "mesh": override.get("mesh", {})}
    with pytest.raises(ConfigError, match=key):
        from_dict(raw).validate()


def test_every_kth_layer_unrolled():
    cfg = from_dict({"model": {"preset": "moe-tiny", "num_layers": 2, "moe_every": 2,
                               "scan_layers": False, "d_model": 16, "num_heads": 2,
                               "vocab_size": 32}}).model
    from llmjax.models import Transformer
    tokens = jnp.ones((1, 6), jnp.int32)

    def run():
        model = Transformer(cfg)
        params = model.init(jax.random.key(0), tokens)["params"]
        return params, apply_collecting(model, {"params": params}, tokens)
    params, out = jax.jit(run)()
    assert [("router" in params["decoder"][f"layers_{i}"]["mlp"]) for i in range(2)] == [
        False, True]
    assert float(out["router"]["assigned"]) == 6 * K  # one MoE layer


@pytest.mark.parametrize("name, total, active", [
    ("mixtral-8x7b", 46_702_792_704, 12_879_925_248),  # Mistral AI; 2 of 8 experts
    ("olmoe-1b-7b", 6_919_161_856, 1_282_017_280),  # allenai/OLMoE-1B-7B: 6.9B / 1.3B
    ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704),  # Qwen/Qwen3-30B-A3B: 30.5B / 3.3B
])
def test_moe_presets_count_exact_total_and_active(name, total, active):
    """Totals as transformers counts the same configs (MixtralForCausalLM, OlmoeForCausalLM,
    Qwen3MoeForCausalLM on the meta device); active = total - the unrouted experts."""
    from llmjax.config import model_config
    from llmjax.metrics import flops_per_token
    from llmjax.models import abstract_params, param_count
    from llmjax.models.moe import inactive_params
    cfg = model_config(name)
    assert param_count(abstract_params(cfg)) == total
    assert total - inactive_params(cfg) == active
    # FLOPs count the active parameters: 6 * (active - embeddings) + attention.
    dense = dataclasses.replace(cfg, num_experts=0)
    assert flops_per_token(cfg, total, 1) == pytest.approx(flops_per_token(dense, active, 1))


@pytest.mark.parametrize("kind, shape", [("head", (8,)), ("full", (16,))])
def test_qk_norm_normalises_queries_and_keys(kind, shape):
    from llmjax.models import Transformer
    cfg = from_dict({"model": {"preset": "llama-tiny", "d_model": 16, "num_heads": 2,
                               "num_kv_heads": 2, "num_layers": 1, "vocab_size": 32,
                               "qk_norm": kind, "scan_layers": False}}).model
    tokens = jnp.arange(6, dtype=jnp.int32)[None]
    params = jax.jit(lambda: Transformer(cfg).init(jax.random.key(0), tokens))()["params"]
    att = nn.unbox(params)["decoder"]["layers_0"]["attention"]
    assert att["query_norm"]["scale"].shape == shape == att["key_norm"]["scale"].shape
