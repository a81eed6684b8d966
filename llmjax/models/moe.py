"""Mixture-of-experts MLP: an fp32 router, SwiGLU experts, two interchangeable dispatches.

  dense     capacity-based dispatch/combine (GShard / Switch): per batch row each expert
            has C = ceil(capacity_factor * length * k / E) slots; one-hot einsums move
            tokens into [row, expert, slot] and back; assignments past a full expert are
            dropped (counted). GSPMD shards the expert dimension over the `expert` mesh axis.
  dropless  every (token, expert) assignment sorted by expert, jax.lax.ragged_dot with
            the group sizes of a bincount, then unsorted. Nothing is dropped.

With capacity for every token the two compute the same function. The layer sows its router
statistics (collection "router") for the objective's balance / z-loss terms and the metrics
(llmjax/objectives/router.py); `collect_router_stats` reads them back.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models.layers import Mlp, constrain, dtype_of, normal_init, param
from llmjax.models.ops import reference
from llmjax.models.ops.reference import ACTIVATIONS

Array = jax.Array

ROUTER = "router"  # the variable collection the statistics are sown into
STATS = ("balance", "z", "load", "dropped", "assigned")


def route(logits: Array, k: int, renormalize: bool):
    """fp32 router: softmax over experts, then top-k. logits [..., E] ->
    (probs [..., E], weights [..., k], expert ids [..., k])."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, ids


def balance_loss(probs: Array, ids: Array, valid: Array, num_experts: int) -> Array:
    """Switch load-balancing loss E * sum_i f_i P_i over valid tokens: f_i the fraction of the
    top-k assignments that go to expert i, P_i the mean router probability of expert i.
    Both sum to 1 over experts, so uniform routing gives exactly 1."""
    valid = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(valid), 1.0)
    k = ids.shape[-1]
    assigned = jnp.sum(jax.nn.one_hot(ids, num_experts) * valid[..., None, None],
                       axis=tuple(range(ids.ndim)))  # [E]
    f = assigned / (n * k)
    p = jnp.sum(probs * valid[..., None], axis=tuple(range(probs.ndim - 1))) / n
    return num_experts * jnp.sum(f * p)


def z_loss(logits: Array, valid: Array) -> Array:
    """Router z-loss: mean over valid tokens of logsumexp(logits)^2 (ST-MoE)."""
    valid = valid.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.square(lse) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def swiglu(x: Array, wi_0: Array, wi_1: Array, wo: Array, act, dtype, matmul) -> Array:
    """wo(act(x wi_0) * x wi_1) with `matmul(lhs, kernel)` the per-expert product (f32
    accumulation, result in `dtype`, as ops.reference.dense); the gate is the ops' reference
    activation."""
    h = reference.activation(act, matmul(x, wi_0.astype(dtype)), matmul(x, wi_1.astype(dtype)),
                             dtype=dtype)
    return matmul(h, wo.astype(dtype))


def dense_dispatch(x: Array, weights: Array, ids: Array, valid: Array, capacity: int,
                   experts, num_experts: int):
    """Capacity dispatch per batch row. x [b, t, d]; weights/ids [b, t, k]; valid [b, t].
    `experts(xe [b, E, C, d]) -> [b, E, C, d]`. Returns (y [b, t, d], dropped count).
    Slots are filled first choice first (all tokens' top-1, then their top-2, ...)."""
    b, t, k = ids.shape
    mask = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32) * valid[..., None, None].astype(
        jnp.int32)  # [b, t, k, E]
    by_choice = jnp.swapaxes(mask, 1, 2).reshape(b, k * t, num_experts)
    slot = jnp.cumsum(by_choice, axis=1) - 1  # position in its expert's queue
    keep = by_choice * (slot < capacity)
    dropped = jnp.sum(by_choice - keep)
    dispatch = jax.nn.one_hot(jnp.where(keep > 0, slot, -1), capacity, dtype=x.dtype)
    dispatch = jnp.swapaxes(dispatch.reshape(b, k, t, num_experts, capacity), 1, 2)  # [b,t,k,E,C]
    combine = jnp.sum(dispatch.astype(jnp.float32) * weights[..., None, None], axis=2)
    dispatch = jnp.sum(dispatch, axis=2)  # [b, t, E, C]: an expert appears once per token
    xe = jnp.einsum("btec,btd->becd", dispatch, x)
    xe = constrain(xe, ("expert_batch", "expert", None, "embed"))
    ye = experts(xe)
    ye = constrain(ye, ("expert_batch", "expert", None, "embed"))
    y = jnp.einsum("btec,becd->btd", combine, ye.astype(jnp.float32))
    return y, dropped


def dropless_dispatch(x: Array, weights: Array, ids: Array, valid: Array, experts,
                      num_experts: int):
    """Sort assignments by expert, run `experts(xs [n*k, d], group_sizes [E])`, unsort.
    Returns (y [b, t, d], 0 dropped)."""
    b, t, k = ids.shape
    d = x.shape[-1]
    flat_ids = ids.reshape(-1)  # [n*k], token-major
    order = jnp.argsort(flat_ids, stable=True)
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    xs = jnp.take(x.reshape(-1, d), order // k, axis=0)  # [n*k, d]
    ys = experts(xs, group_sizes)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(b, t, k, d)
    w = weights * valid[..., None].astype(weights.dtype)
    return jnp.einsum("btkd,btk->btd", y.astype(jnp.float32), w), jnp.zeros((), jnp.int32)


class MoeMlp(nn.Module):
    """Routed SwiGLU experts (+ an optional sigmoid-gated shared expert)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, valid: Array, deterministic: bool = True) -> Array:
        """x [b, t, d], valid [b, t] (False: padding, routed nowhere) -> [b, t, d]."""
        cfg = self.cfg
        e, k, f, d = cfg.num_experts, cfg.experts_per_token, cfg.expert_hidden, cfg.d_model
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        std = cfg.initializer_range
        router = param(self, "router", normal_init(std), (d, e), ("embed", None), pdtype)
        wi_0 = param(self, "wi_0", normal_init(std), (e, d, f), ("expert", "embed", "mlp"), pdtype)
        wi_1 = param(self, "wi_1", normal_init(std), (e, d, f), ("expert", "embed", "mlp"), pdtype)
        wo = param(self, "wo", normal_init(std / math.sqrt(2 * max(cfg.num_layers, 1))),
                   (e, f, d), ("expert", "mlp", "embed"), pdtype)
        act = ACTIVATIONS[cfg.activation]

        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router.astype(jnp.float32))
        probs, weights, ids = route(logits, k, cfg.moe_renormalize)
        xd = x.astype(dtype)
        if cfg.moe_impl == "dense":
            capacity = max(1, math.ceil(cfg.capacity_factor * x.shape[1] * k / e))

            def experts(xe):  # [b, E, C, d]
                mm = lambda h, w: jnp.einsum("becd,edf->becf", h, w,  # noqa: E731
                                             preferred_element_type=jnp.float32).astype(dtype)
                return swiglu(xe, wi_0, wi_1, wo, act, dtype, mm)
            y, dropped = dense_dispatch(xd, weights, ids, valid, capacity, experts, e)
        else:
            def experts(xs, group_sizes):  # [n*k, d]
                mm = lambda h, w: jax.lax.ragged_dot(  # noqa: E731
                    h, w, group_sizes, preferred_element_type=jnp.float32).astype(dtype)
                return swiglu(xs, wi_0, wi_1, wo, act, dtype, mm)
            y, dropped = dropless_dispatch(xd, weights, ids, valid, experts, e)

        if cfg.moe_shared_d_ff:
            shared_cfg = dataclasses.replace(cfg, d_ff=cfg.moe_shared_d_ff, gated_mlp=True,
                                             use_bias=False)
            shared = Mlp(shared_cfg, name="shared")(xd, deterministic).astype(jnp.float32)
            gate = param(self, "shared_gate", normal_init(std), (d, 1), ("embed", None), pdtype)
            g = jax.nn.sigmoid(jnp.einsum("btd,do->bto", x.astype(jnp.float32),
                                          gate.astype(jnp.float32)))
            y = y + g * shared

        v = valid.astype(jnp.float32)
        load = jnp.sum(jax.nn.one_hot(ids, e) * v[..., None, None], axis=(0, 1, 2))  # [E]
        stats = {"balance": balance_loss(probs, ids, valid, e), "z": z_loss(logits, valid),
                 "load": load, "dropped": dropped.astype(jnp.float32),
                 "assigned": jnp.sum(v) * k}
        for name, value in stats.items():
            self.sow(ROUTER, name, value)
        return constrain(y.astype(dtype), ("batch", "length", "embed"))


def collect_router_stats(variables) -> dict[str, Array]:
    """Reduce the sown statistics over MoE layers (scanned: a leading layer axis; unrolled:
    one entry per layer): balance, z and load [E] (tokens per expert) as means over layers,
    dropped / assigned (top-k assignments) as totals. Empty when the model sowed nothing
    (a dense model)."""
    found = {name: [] for name in STATS}

    def visit(tree):
        for key, value in tree.items():
            if key in found and isinstance(value, tuple):
                found[key].extend(value)
            elif isinstance(value, dict):
                visit(value)
    visit(variables.get(ROUTER, {}))
    if not found["balance"]:
        return {}
    layers = sum(jnp.size(v) for v in found["balance"])
    out = {}
    for name, values in found.items():
        if name == "load":  # [E] per unrolled layer or [L, E] scanned: mean over layers
            out[name] = sum(v.reshape(-1, v.shape[-1]).sum(0) for v in values) / layers
        else:
            flat = jnp.concatenate([jnp.reshape(v, (-1,)) for v in values])
            out[name] = jnp.mean(flat) if name in ("balance", "z") else jnp.sum(flat)
    return out


def apply_collecting(model, variables, *args, **kwargs) -> dict:
    """model.apply with the router collection mutable: the outputs dict plus
    outputs["router"] = collect_router_stats(...) (absent for a dense model)."""
    outputs, state = model.apply(variables, *args, mutable=[ROUTER], **kwargs)
    stats = collect_router_stats(state)
    return {**outputs, "router": stats} if stats else outputs


ROUTER_SUMS = ("load", "dropped", "assigned")  # statistics that add over micro-batches


def router_metrics(stats: dict) -> dict[str, Array]:
    """Train-step metrics from the summed statistics: the fraction of top-k assignments
    dropped (dense dispatch over capacity) and the fewest / most tokens an expert got
    (per MoE layer, mean over layers). Empty for a dense model."""
    if not stats:
        return {}
    return {"router_dropped_fraction": stats["dropped"] / jnp.maximum(stats["assigned"], 1.0),
            "expert_load_min": jnp.min(stats["load"]),
            "expert_load_max": jnp.max(stats["load"])}


def moe_layers(cfg: ModelConfig) -> int:
    """How many layers have an MoE MLP."""
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))


def inactive_params(cfg: ModelConfig) -> int:
    """Parameters a token does not use: the experts it is not routed to (num_experts -
    experts_per_token SwiGLU experts of 3 * d_model * expert_hidden, per MoE layer).
    total - inactive = active parameters (the published "A3B" figures, FLOPs per token)."""
    if not cfg.num_experts:
        return 0
    per_expert = 3 * cfg.d_model * cfg.expert_hidden
    return (cfg.num_experts - cfg.experts_per_token) * per_expert * moe_layers(cfg)
