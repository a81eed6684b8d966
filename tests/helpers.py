"""What several test modules share (test modules never import each other): fast compile
options, host copies, tree comparison, tiny models with cached jitted applies, and the
one-SGD-step runs on a device mesh that sharded tests compare with one device.

Fixtures (no_compiles, cache_dir, child_script) live in conftest.py.
"""
from __future__ import annotations

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import from_dict
from llmjax.data.device import to_global
from llmjax.data.pipeline import make_iterator
from llmjax.models import Transformer, init_params
from llmjax.train.experiment import build

# A few paragraphs of text for data pipelines (tests/test_storage*.py, conftest's `prepared`).
TEXT = ("The quick brown fox jumps over the lazy dog. " * 6 + "\n\n") * 4

# LLVM -O0 for these tiny programs: half the compile time, same HLO on every mesh.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def host(tree):
    """A numpy copy of a (device) tree."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def close_trees(a, b, rtol):
    """Every leaf within rtol of the largest magnitude in the whole reference tree `a`."""
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        err = float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: {err} > {rtol} * {scale}"


# ------------------------------------------------------------------ tiny models

_APPLY: dict = {}
_PARAMS: dict = {}


def jitted_apply(cfg):
    """One jitted forward `(params, inputs dict) -> outputs` per model config (ModelConfig is
    not hashable: keyed by repr), shared by every module of the session."""
    if repr(cfg) not in _APPLY:
        _APPLY[repr(cfg)] = jax.jit(
            lambda params, inputs: Transformer(cfg).apply({"params": params}, **inputs))
    return _APPLY[repr(cfg)]


def initial_params(cfg):
    """init_params(cfg, key 0), jitted (eager init dispatches op by op: slow on 2 cores) and
    cached per config."""
    if repr(cfg) not in _PARAMS:
        _PARAMS[repr(cfg)] = jax.jit(lambda rng: init_params(cfg, rng))(jax.random.key(0))
    return _PARAMS[repr(cfg)]


# ------------------------------------------------------------------ one SGD step on a mesh


def sgd_config(preset: str, objective: str, mesh=(1, 1, 1), model=None, train=None,
               optimizer=None, peft=None):
    """A tiny run whose one step changes each parameter by exactly minus its gradient (SGD,
    lr 1, no clipping); 8 heads of 8 so that tensor=8 divides them."""
    return from_dict({
        "model": {"preset": preset, "num_heads": 8, "head_dim": 8, **(model or {})},
        "objective": {"name": objective},
        # expert: MoE meshes; context: tests/test_context_parallel.py
        "mesh": dict(zip(("data", "fsdp", "tensor", "expert", "context"), mesh)),
        "train": {"batch_size": 8, "seq_len": 32, "steps": 10, **(train or {})},
        # SGD, lr 1, no clipping: the update is exactly minus the gradient.
        "optimizer": {"name": "sgd", "b1": 0.0, "learning_rate": 1.0, "schedule": "constant",
                      "warmup_steps": 0, "grad_clip": 0.0, **(optimizer or {})},
        **({"peft": peft} if peft else {}),
    })


def compiled_step(exp, shardings, batch):
    """exp.train_step (jit with in/out shardings and donation), compiled ahead of time."""
    step = exp.train_step(batch.keys(), shardings)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    return step.lower(exp.abstract_state(), spec).compile(FAST_COMPILE)


def fast_init(exp):
    """Experiment.init_state (jit with out_shardings, under the mesh and rules), compiled -O0."""
    init = jax.jit(exp._init_fn, out_shardings=exp.state_shardings())
    key = jax.random.key(exp.config.train.seed)
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        return init.lower(key).compile(FAST_COMPILE)(key)


class MeshRuns:
    """One step of one model on every mesh, from the single-device init, computed lazily."""

    def __init__(self, preset: str, objective: str, model: dict | None = None,
                 peft: dict | None = None):
        self.preset, self.objective, self.model, self.peft = preset, objective, model or {}, peft
        ref = build(sgd_config(preset, objective, model=self.model, peft=peft),
                    devices=jax.devices()[:1])
        self.batch = next(make_iterator(ref.config.data, ref.objective.batch_kind, 32, 8,
                                        vocab_size=ref.config.model.vocab_size))
        init = fast_init(ref)
        self.key_impl = jax.random.key_impl(init.rng)
        self.init = host(init.replace(rng=jax.random.key_data(init.rng)))  # on the host
        self.params0 = self.init.params
        self.runs: dict = {}

    def run(self, mesh, **model):
        """(experiment, state after one step, metrics) on `mesh`, with model overrides."""
        key = (mesh, tuple(sorted(model.items())))
        if key not in self.runs:
            exp = build(sgd_config(self.preset, self.objective, mesh,
                                   model={**self.model, **model}, peft=self.peft),
                        devices=jax.devices()[:math.prod(mesh)])
            shardings = exp.state_shardings()
            # The single-device init, copied from the host onto this mesh (the step donates it).
            state = jax.device_put(self.init, shardings)
            state = state.replace(rng=jax.random.wrap_key_data(state.rng, impl=self.key_impl))
            step = compiled_step(exp, shardings, self.batch)
            batch = to_global(self.batch, exp.batch_shardings(self.batch))
            new, metrics = step(state, batch)
            self.runs[key] = (exp, new, host(metrics))
        return self.runs[key]


# ------------------------------------------------------------------ kernels vs the reference

_KERNEL_PARAMS: dict = {}


def kernel_outputs_and_grads(preset: str, kernels: str, dtype: str = "float32", **overrides):
    """(outputs, parameter gradients) of one model on a packed + padded batch, for a loss that
    depends on every logit and on the hidden states (tests/test_kernels_*.py compare
    model.kernels choices). The parameters do not depend on the kernels: initialised once per
    (preset, dtype, overrides), jitted, and shared by both sides of a comparison."""
    from llmjax.config import model_config

    cfg = model_config(preset, kernels=kernels, dtype=dtype, **overrides)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(5, cfg.vocab_size, (2, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 10 + [2] * 6, [1] * 13 + [0] * 3], jnp.int32)  # packed + pad
    inputs = {"tokens": tokens, "segment_ids": segments}
    if cfg.architecture == "encoder_decoder":
        inputs["decoder_tokens"] = tokens[:, :12]
        inputs["decoder_segment_ids"] = segments[:, :12]
    key = (preset, dtype, tuple(sorted(overrides.items())))
    if key not in _KERNEL_PARAMS:
        _KERNEL_PARAMS[key] = jax.jit(lambda rng: nn.unbox(
            model.init({"params": rng}, **inputs)["params"]))(jax.random.key(0))
    params = _KERNEL_PARAMS[key]
    probe = jnp.asarray(rng.standard_normal((2, 16 if cfg.architecture != "encoder_decoder"
                                             else 12, cfg.d_model)), jnp.float32)

    def loss(p):
        out = model.apply({"params": p}, **inputs)
        logits = out["logits"].astype(jnp.float32)
        value = jnp.sum(jnp.sin(logits)) + jnp.sum(out["hidden"].astype(jnp.float32) * probe)
        return value, out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads


def xla_flags(devices: int) -> str:
    """This process's XLA_FLAGS with `devices` emulated CPU devices instead of its own count:
    a child started with them compiles like the parent (same numerics, same compile cache keys)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
