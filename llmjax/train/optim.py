"""optax optimizers and learning-rate schedules, looked up by name."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from llmjax.config import ConfigError, OptimizerConfig

_OPTIMIZERS: dict[str, Callable] = {}


def register_optimizer(name: str):
    def add(fn):
        _OPTIMIZERS[name] = fn
        return fn
    return add


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then constant / cosine / linear decay / rsqrt."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    decay = max((cfg.decay_steps or total_steps) - warmup, 1)
    end = peak * cfg.end_learning_rate_fraction
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=cfg.end_learning_rate_fraction)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay)
    else:  # rsqrt: peak * sqrt(warmup / step) after warmup (T5)
        after = lambda step: peak * jax.lax.rsqrt((step + max(warmup, 1)) / max(warmup, 1))  # noqa: E731
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: never on norms' scales or biases."""
    def keep(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name in ("scale", "bias") or name.endswith("_bias"))
    return jax.tree_util.tree_map_with_path(keep, params)


@register_optimizer("adamw")
def _adamw(cfg: OptimizerConfig, lr):
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=decay_mask)


def decoupled_weight_decay(rate: float, lr) -> optax.GradientTransformation:
    """updates - lr(step) * rate * params on the leaves of `decay_mask` (AdamW-style decay)."""
    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        step_lr = lr(state.count) if callable(lr) else lr
        updates = jax.tree.map(lambda u, p, m: u - step_lr * rate * p if m else u,
                               updates, params, decay_mask(params))
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


@register_optimizer("adafactor")
def _adafactor(cfg: OptimizerConfig, lr):
    # optax.adafactor's weight_decay_rate is added *after* its learning-rate scaling (params
    # shrink by the full rate every step: 0.1 collapses a model in a few dozen steps); decay
    # by lr * weight_decay instead, like adamw and lion.
    tx = optax.adafactor(lr)
    if not cfg.weight_decay:
        return tx
    return optax.chain(tx, decoupled_weight_decay(cfg.weight_decay, lr))


@register_optimizer("lion")
def _lion(cfg: OptimizerConfig, lr):
    return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)


@register_optimizer("sgd")
def _sgd(cfg: OptimizerConfig, lr):
    return optax.sgd(lr, momentum=cfg.b1 or None)


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
    """(optax transformation, schedule): clipping by global norm, then the optimizer."""
    if cfg.name not in _OPTIMIZERS:
        raise ConfigError(f"optimizer.name={cfg.name!r} is not one of {sorted(_OPTIMIZERS)}")
    lr = schedule(cfg, total_steps)
    tx = _OPTIMIZERS[cfg.name](cfg, lr)
    if cfg.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, lr
