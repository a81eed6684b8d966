"""The jitted train and eval steps: prepare -> apply -> loss -> grad -> update.

Loss terms are normalised by their token counts over the whole global batch
(known from the prepared batch before the forward pass), so k accumulated
micro-batches give exactly the gradient of one step on the full batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from llmjax.models.moe import ROUTER_SUMS, apply_collecting, router_metrics
from llmjax.objectives import MODEL_INPUTS, ChunkedLogits, Objective

Batch = dict[str, jax.Array]


def model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def forward(model, params, batch: Batch, logits_chunk: int = 0, **kwargs) -> dict:
    """model.apply on the batch's model inputs. With `logits_chunk` > 0 the LM logits are
    left to the loss (ChunkedLogits: the head applied that many positions at a time)."""
    variables = {"params": params}
    # MoE models: also collect the layers' router statistics into outputs["router"].
    apply = (functools.partial(apply_collecting, model) if model.cfg.num_experts
             else model.apply)
    if not logits_chunk:
        return apply(variables, **model_inputs(batch), **kwargs)
    outputs = apply(variables, **model_inputs(batch), logits=False, **kwargs)
    head = lambda hidden: model.apply(variables, hidden, method="lm_logits")  # noqa: E731
    return {**outputs, "logits": ChunkedLogits(outputs["hidden"], head, logits_chunk)}


def with_reference(outputs: dict, model, plan, objective, trainable, frozen, batch: Batch,
                   logits_chunk: int) -> dict:
    """outputs plus outputs["reference"]: the reference model's outputs (no dropout, no
    gradients) when the objective compares against one (dpo; llmjax/peft/reference.py)."""
    if not getattr(objective, "needs_reference", False):
        return outputs
    ref = forward(model, plan.reference(trainable, frozen), batch, logits_chunk,
                  deterministic=True)
    return {**outputs, "reference": ref}


def weighted_loss(terms: dict, totals: dict, weights: dict) -> jax.Array:
    """sum over terms of weight * loss_sum / global count (report-only terms have no weight)."""
    return sum(weights[name] * term.loss_sum / jnp.maximum(totals[name], 1.0)
               for name, term in terms.items() if name in weights)


def term_metrics(terms: dict, totals: dict, reports=()) -> dict[str, jax.Array]:
    out = {}
    for name, term in terms.items():
        if name in reports:  # a mean logged beside the loss (dpo rewards)
            out[name] = term.loss_sum / jnp.maximum(totals[name], 1.0)
            continue
        out[f"{name}_loss"] = term.loss_sum / jnp.maximum(totals[name], 1.0)
        if not name.startswith("router_"):  # MoE router losses have no accuracy
            out[f"{name}_accuracy"] = term.correct / jnp.maximum(totals[name], 1.0)
    return out


def _micro_batches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, ... (no data movement
    across devices: each device's rows split evenly)."""
    def split(x):
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(model, objective: Objective, tx: optax.GradientTransformation, plan,
                    schedule: Callable, grad_accum: int = 1, logits_chunk: int = 0,
                    skip_nonfinite: bool = False) -> Callable:
    """state, batch -> state, metrics (not jitted: see `jit_train_step`).

    metrics["nonfinite"] is 1 when the loss or the gradient norm is NaN/inf (read by the
    host at its read-backs, llmjax/train/guard.py). With `skip_nonfinite` such a step
    leaves params and optimizer state as they were (the step counter still advances, so
    the data and the schedule move on); no state is added, so checkpoints keep their tree.
    """

    def loss_fn(trainable, frozen, micro: Batch, rng, totals):
        params = plan.merge(trainable, frozen)
        outputs = forward(model, params, micro, logits_chunk, deterministic=False,
                          rngs={"dropout": rng})
        outputs = with_reference(outputs, model, plan, objective, trainable, frozen, micro,
                                 logits_chunk)
        terms = objective.loss(outputs, micro)
        stats = {k: v for k, v in outputs.get("router", {}).items() if k in ROUTER_SUMS}
        return weighted_loss(terms, totals, objective.term_weights), (terms, stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        prepare_rng, dropout_rng = jax.random.split(rng)
        batch = objective.prepare(batch, prepare_rng)
        totals = objective.counts(batch)
        if grad_accum == 1:
            (loss, (terms, stats)), grads = grad_fn(state.params, state.frozen, batch,
                                                    dropout_rng, totals)
        else:
            def body(carry, xs):
                micro, i = xs
                (loss, aux), grads = grad_fn(state.params, state.frozen, micro,
                                             jax.random.fold_in(dropout_rng, i), totals)
                return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None
            zero_terms = jax.eval_shape(lambda: grad_fn(
                state.params, state.frozen, jax.tree.map(lambda x: x[0], _micro_batches(
                    batch, grad_accum)), dropout_rng, totals)[0][1])
            init = (jnp.zeros((), jnp.float32),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_terms),
                    jax.tree.map(jnp.zeros_like, state.params))
            (loss, (terms, stats), grads), _ = jax.lax.scan(
                body, init, (_micro_batches(batch, grad_accum), jnp.arange(grad_accum)))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            def keep(new, old):
                return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": schedule(state.step), **term_metrics(terms, totals, getattr(objective, "reports", ())),
                   "tokens": jnp.sum(batch.get("segment_ids", batch["tokens"]) != 0),
                   "nonfinite": (~finite).astype(jnp.int32), **router_metrics(stats)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model, objective: Objective, plan, logits_chunk: int = 0) -> Callable:
    """state, batch -> {term: (loss_sum, count, correct)} summed, for host-side averaging;
    also the objective's reported means (dpo rewards: (value_sum, count, 0))."""

    def eval_step(state, batch: Batch):
        rng = jax.random.fold_in(state.rng, 2**31 - 1)  # fixed masking noise: comparable evals
        batch = objective.prepare(batch, rng)
        params = plan.merge(state.params, state.frozen)
        outputs = forward(model, params, batch, logits_chunk, deterministic=True)
        outputs = with_reference(outputs, model, plan, objective, state.params, state.frozen,
                                 batch, logits_chunk)
        kept = set(objective.term_weights) | set(getattr(objective, "reports", ()))
        return {name: tuple(term) for name, term in objective.loss(outputs, batch).items()
                if name in kept}

    return eval_step


def jit_step(fn: Callable, mesh, rules, state_sh, batch_sh, donate: bool = True) -> Callable:
    """jit with NamedSharding in/out shardings (pjit) and state donation, traced under the
    mesh and the logical-axis rules so activation constraints resolve."""
    import flax.linen as nn

    out_sh = (state_sh, None) if donate else None
    jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh), out_shardings=out_sh,
                     donate_argnums=(0,) if donate else ())

    def call(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    call.jitted = jitted
    call.lower = lambda state, batch: _lower(jitted, mesh, rules, state, batch)
    return call


def _lower(jitted, mesh, rules, state, batch) -> Any:
    import flax.linen as nn
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted.lower(state, batch)
