"""The jitted train step, optimizers and schedules (issue 3, "Must show").

- Gradient accumulation over 4 micro-batches equals one step on the whole
  batch (SGD with lr 1, so the parameter change *is* the gradient: a
  normalisation error cannot hide behind Adam's scale invariance).
- A tiny model overfits one fixed batch for every family/objective pair.
- AdamW, Adafactor and Lion build and step; their first updates and weight
  decay follow the formulas, computed here with numpy; the decay mask leaves
  norms and biases alone; schedules match their closed forms.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import parallel
from llmjax.config import OptimizerConfig, from_dict, model_config
from llmjax.data.device import to_global
from llmjax.data.pipeline import make_iterator
from llmjax.models import abstract_params
from llmjax.train import optim
from llmjax.train.experiment import build
from llmjax.tree import flatten_parts
from helpers import FAST_COMPILE, host

BATCH, SEQ = 8, 32


def experiment(preset, objective, model=None, optimizer=None, train=None):
    cfg = from_dict({
        "model": {"preset": preset, **(model or {})},
        "objective": {"name": objective},
        "mesh": {"data": 1},
        "train": {"batch_size": BATCH, "seq_len": SEQ, "steps": 100, **(train or {})},
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 5, "schedule": "constant",
                      **(optimizer or {})},
    })
    return build(cfg, devices=jax.devices()[:1])


def first_batch(exp) -> dict:
    cfg = exp.config
    return next(make_iterator(cfg.data, exp.objective.batch_kind, SEQ, BATCH,
                              vocab_size=cfg.model.vocab_size))


_INITS: dict = {}  # (model, optimizer) -> initial state on the host (one compile each)


def init_state(exp, shardings):
    """Experiment.init_state compiled with FAST_COMPILE, cached on the host per model and
    optimizer (grad_accum and the objective do not change it), placed afresh on each call."""
    cfg = exp.config
    cache_key = repr((cfg.model, cfg.optimizer, cfg.train.seed))
    if cache_key not in _INITS:
        key = jax.random.key(cfg.train.seed)
        init = jax.jit(exp._init_fn, out_shardings=shardings)
        with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
            state = init.lower(key).compile(FAST_COMPILE)(key)
        _INITS[cache_key] = (host(state.replace(rng=jax.random.key_data(state.rng))),
                             jax.random.key_impl(state.rng))
    data, impl = _INITS[cache_key]
    state = jax.device_put(data, shardings)
    return state.replace(rng=jax.random.wrap_key_data(state.rng, impl=impl))


def start(exp, batch):
    """(initial state, compiled train step, global batch) of an experiment on its mesh.

    Experiment.train_step compiled ahead of time with FAST_COMPILE.
    """
    shardings = exp.state_shardings()
    state = init_state(exp, shardings)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step = exp.train_step(batch.keys(), shardings).lower(exp.abstract_state(), spec)
    return state, step.compile(FAST_COMPILE), to_global(batch, parallel.batch_sharding(exp.mesh))


# ------------------------------------------------------------------ gradient accumulation

SGD = {"name": "sgd", "b1": 0.0, "learning_rate": 1.0, "warmup_steps": 0, "grad_clip": 0.0}


@pytest.mark.parametrize("preset,objective", [("gpt-tiny", "clm"), ("bert-tiny", "mlm+nsp")])
def test_grad_accumulation_equals_full_batch(preset, objective):
    results = {}
    for k in (1, 4):
        exp = experiment(preset, objective, optimizer=SGD, train={"grad_accum": k})
        batch = first_batch(exp)
        state, step, gb = start(exp, batch)
        before = host(state.params)
        after, metrics = step(state, gb)
        grads = jax.tree.map(np.subtract, before, host(after.params))
        results[k] = (grads, host(metrics))
    (g1, m1), (g4, m4) = results[1], results[4]
    # The micro-batches really differ in size (token counts), so per-micro-batch
    # normalisation would be caught: the loss is normalised by the whole batch's count.
    for key in m1:
        if key != "learning_rate":
            np.testing.assert_allclose(m4[key], m1[key], rtol=2e-5, err_msg=key)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g1))
    assert scale > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4), g4, g1)


# ------------------------------------------------------------------ overfitting one batch

# (preset, objective, model overrides, optimizer overrides, criterion)
PAIRS = [
    ("gpt-tiny", "clm", {}, {}, "below"),
    ("gpt-tiny", "prefix_lm", {}, {}, "below"),
    ("llama-tiny", "clm", {}, {"name": "lion"}, "below"),
    ("palm-tiny", "clm", {}, {}, "below"),
    ("bert-tiny", "mlm+nsp", {}, {}, "falls"),  # fresh masks and NSP pairs every step
    ("t5-tiny", "span_corruption", {}, {"name": "adafactor", "learning_rate": 1e-2}, "falls"),
    ("t5-tiny", "seq2seq", {}, {}, "below"),
    ("bert-tiny", "classification", {"num_labels": 2}, {}, "below"),
]
MAX_STEPS = 100
THRESHOLD = 0.5  # "below": loss under this
FRACTION = 0.5  # "falls": mean of the last 5 losses under this fraction of the first


def _done(criterion, history) -> bool:
    if criterion == "below":
        return history[-1]["loss"] < THRESHOLD
    if len(history) < 5:
        return False
    recent = {k: np.mean([h[k] for h in history[-5:]]) for k in history[0]}
    first = history[0]
    ok = recent["loss"] < FRACTION * first["loss"]
    if "mlm_loss" in first:  # the MLM term itself, not only the NSP term, must be learnt
        ok &= recent["mlm_loss"] < FRACTION * first["mlm_loss"]
    return bool(ok)


@pytest.mark.parametrize("preset,objective,model,optimizer,criterion", PAIRS,
                         ids=[f"{p.split('-')[0]}-{o}" for p, o, *_ in PAIRS])
def test_tiny_model_overfits_one_batch(preset, objective, model, optimizer, criterion):
    exp = experiment(preset, objective, model, optimizer)
    batch = first_batch(exp)
    state, step, gb = start(exp, batch)
    history = []
    for _ in range(MAX_STEPS):
        state, metrics = step(state, gb)
        history.append({k: float(v) for k, v in metrics.items()})
        assert math.isfinite(history[-1]["loss"]), history[-1]
        if _done(criterion, history):
            break
    losses = [round(h["loss"], 3) for h in history]
    assert _done(criterion, history), f"{preset}/{objective}: no overfit in {MAX_STEPS} steps: {losses[::5]}"
    # The step's learning-rate metric is the schedule at the pre-update step.
    lrs = [h["learning_rate"] for h in history]
    np.testing.assert_allclose(lrs, [float(exp.schedule(i)) for i in range(len(lrs))], rtol=1e-6)
    assert int(state.step) == len(history)


# ------------------------------------------------------------------ optimizers

TOY_DECAYED = {("dense", "kernel"), ("embed", "embedding"), ("heads", "kernel")}


def toy_params():
    rng = np.random.RandomState(0)
    shapes = {("dense", "kernel"): (6, 4), ("dense", "bias"): (4,), ("norm", "scale"): (4,),
              ("norm", "bias"): (4,), ("embed", "embedding"): (10, 4), ("heads", "kernel"): (4, 3),
              ("heads", "mlm_bias"): (3,)}
    params: dict = {}
    for (a, b), shape in shapes.items():
        params.setdefault(a, {})[b] = jnp.asarray(rng.randn(*shape), jnp.float32)
    return params


def flat(tree) -> dict:
    return {path: np.asarray(v) for path, v in flatten_parts(tree).items()}


def test_decay_mask_excludes_norms_and_biases_of_every_family():
    for preset in ("gpt-tiny", "bert-tiny", "t5-tiny", "palm-tiny", "llama-tiny"):
        params = nn.unbox(abstract_params(model_config(preset)))
        mask = flat(optim.decay_mask(params))
        for path, decayed in mask.items():
            is_norm = any("norm" in k for k in path[:-1]) and path[-1] in ("scale", "bias")
            is_bias = path[-1] == "bias" or path[-1].endswith("_bias")
            assert bool(decayed) == (not is_norm and not is_bias), (preset, path)
        assert any(mask.values()) and not all(mask.values())


def cfg(name, **kw):
    base = dict(name=name, learning_rate=0.1, schedule="constant", warmup_steps=0, grad_clip=0.0)
    return OptimizerConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_weight_decay_is_lr_times_rate_on_decayed_leaves_only(name):
    """With zero gradients an update is pure decoupled weight decay: -lr * wd * p, or 0."""
    params = toy_params()
    tx, _ = optim.make_optimizer(cfg(name, weight_decay=0.5), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for path, u in flat(updates).items():
        p = flat(params)[path]
        expected = -0.1 * 0.5 * p if path in TOY_DECAYED else np.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-7, err_msg=f"{name} {path}")


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_first_update_follows_the_formula(name):
    params = toy_params()
    rng = np.random.RandomState(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), jnp.float32), params)
    c = cfg(name, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8)
    tx, _ = optim.make_optimizer(c, 10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for path, u in flat(updates).items():
        g, p = flat(grads)[path], flat(params)[path]
        if name == "adamw":  # bias-corrected m/sqrt(v) = g/|g| at step 1
            direction = g / (np.abs(g) + 1e-8)
        else:  # lion: sign(b1 * m + (1 - b1) * g) with m = 0
            direction = np.sign(g)
        decay = 0.1 * p if path in TOY_DECAYED else 0.0
        np.testing.assert_allclose(u, -0.1 * (direction + decay), rtol=1e-5, atol=1e-7,
                                   err_msg=f"{name} {path}")


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_optimizer_minimises_a_quadratic(name):
    params = toy_params()
    target = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    tx, _ = optim.make_optimizer(cfg(name, learning_rate=0.05, weight_decay=0.0, grad_clip=1.0), 100)

    def loss(p):
        return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    @jax.jit
    def run(p):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss(p)
        return jax.lax.scan(body, (p, tx.init(p)), None, length=100)[1]

    losses = np.asarray(run(params))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_unknown_optimizer_is_a_config_error():
    from llmjax.config import ConfigError
    with pytest.raises(ConfigError, match="optimizer.name='adam'"):
        optim.make_optimizer(cfg("adam"), 10)


# ------------------------------------------------------------------ schedules

PEAK, WARMUP, TOTAL, END = 1e-3, 10, 110, 0.1


def reference_lr(kind: str, step: int) -> float:
    """The closed forms: linear warmup from 0, then the decay over TOTAL - WARMUP steps."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    t = min(step - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)
    end = PEAK * END
    return {"constant": PEAK,
            "cosine": end + (PEAK - end) * 0.5 * (1 + math.cos(math.pi * t)),
            "linear": PEAK + (end - PEAK) * t,
            "rsqrt": PEAK * math.sqrt(WARMUP / max(step, 1))}[kind]


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "rsqrt"])
def test_schedule_matches_formula(kind):
    schedule = optim.schedule(OptimizerConfig(learning_rate=PEAK, warmup_steps=WARMUP,
                                              schedule=kind, end_learning_rate_fraction=END), TOTAL)
    for step in (0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 400):
        np.testing.assert_allclose(float(schedule(step)), reference_lr(kind, step), rtol=1e-5,
                                   atol=1e-12, err_msg=f"{kind} step {step}")
