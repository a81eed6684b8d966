"""Sharded training equals single-device training (issue 3, "Must show").

One train step from the same initial state and batch on every mesh
(data, fsdp, tensor) in MESHES, for a decoder and for T5, against the run on
one device. The optimizer is plain SGD with learning rate 1 and no clipping,
so `params_before - params_after` *is* the gradient of every leaf and the
comparison covers gradients leaf by leaf, not only their norm. The tiny
presets get 8 heads (head_dim 8) so that tensor=8 divides them.

Also: with fsdp > 1 no large parameter (or Adam moment) is fully replicated,
sharded init equals single-device init, and inconsistent configs fail with a
ConfigError naming the key before anything is compiled.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from llmjax import parallel
from llmjax.config import ConfigError, MeshConfig, from_dict
from llmjax.data.device import to_global
from llmjax.data.pipeline import make_iterator
from llmjax.train.experiment import build

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
MODELS = {  # name -> (preset, objective)
    "gpt": ("gpt-tiny", "clm"),
    "t5": ("t5-tiny", "span_corruption"),
}
LARGE = 4096  # elements: a parameter this big must be sharded when fsdp > 1


def config(preset: str, objective: str, mesh=(1, 1, 1), model=None, train=None, optimizer=None):
    return from_dict({
        "model": {"preset": preset, "num_heads": 8, "head_dim": 8, **(model or {})},
        "objective": {"name": objective},
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh)),
        "train": {"batch_size": 8, "seq_len": 32, "steps": 10, **(train or {})},
        # SGD, lr 1, no clipping: the update is exactly minus the gradient.
        "optimizer": {"name": "sgd", "b1": 0.0, "learning_rate": 1.0, "schedule": "constant",
                      "warmup_steps": 0, "grad_clip": 0.0, **(optimizer or {})},
    })


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


# LLVM -O0 for these tiny programs: half the compile time, same HLO on every mesh.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


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

    def __init__(self, preset: str, objective: str, model: dict | None = None):
        self.preset, self.objective, self.model = preset, objective, model or {}
        ref = build(config(preset, objective, model=self.model), devices=jax.devices()[:1])
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
            exp = build(config(self.preset, self.objective, mesh, model={**self.model, **model}),
                        devices=jax.devices()[:math.prod(mesh)])
            shardings = exp.state_shardings()
            # The single-device init, copied from the host onto this mesh (the step donates it).
            state = jax.device_put(self.init, shardings)
            state = state.replace(rng=jax.random.wrap_key_data(state.rng, impl=self.key_impl))
            step = compiled_step(exp, shardings, self.batch)
            batch = to_global(self.batch, parallel.batch_sharding(exp.mesh))
            new, metrics = step(state, batch)
            self.runs[key] = (exp, new, host(metrics))
        return self.runs[key]


_RUNS: dict = {}


def mesh_runs(name: str) -> MeshRuns:
    if name not in _RUNS:
        _RUNS[name] = MeshRuns(*MODELS[name])
    return _RUNS[name]


@pytest.fixture(scope="module", params=list(MODELS))
def runs(request):
    return mesh_runs(request.param)


@pytest.mark.parametrize("mesh", MESHES[1:], ids=lambda m: "x".join(map(str, m)))
def test_one_step_matches_single_device(runs, mesh):
    _, ref_state, ref = runs.run((1, 1, 1))
    exp, state, got = runs.run(mesh)
    assert dict(exp.mesh.shape) == dict(zip(("data", "fsdp", "tensor"), mesh))
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)
    for key in ("tokens",) + tuple(k for k in ref if k.endswith("_accuracy")):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6)
    # Per-leaf gradients (lr 1 SGD): g = params_before - params_after.
    ref_grads = jax.tree.map(np.subtract, runs.params0, host(ref_state.params))
    grads = jax.tree.map(np.subtract, runs.params0, host(state.params))
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        r = ref_grads
        for key in path:
            r = r[key.key]
        np.testing.assert_allclose(g, r, atol=1e-5 * scale, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    # The gradient is not trivially zero, and the state stayed on this mesh.
    assert float(ref["grad_norm"]) > 0.1
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.mesh.devices.size == math.prod(mesh)


@pytest.mark.parametrize("mesh", [m for m in MESHES if m[1] > 1], ids=lambda m: "x".join(map(str, m)))
def test_fsdp_shards_every_large_parameter(runs, mesh):
    _, state, _ = runs.run(mesh)
    large = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        if leaf.size > LARGE:
            large += 1
            assert not leaf.sharding.is_fully_replicated, (jax.tree_util.keystr(path),
                                                           leaf.sharding.spec)
            # Each device holds a fraction of it.
            shard = leaf.addressable_shards[0].data
            assert shard.size < leaf.size
    assert large >= 5


def test_sharded_init_equals_single_device_init():
    """init_state on a (2, 2, 2) mesh: the same values, born sharded (no gather to one device)."""
    runs = mesh_runs("gpt")
    exp = build(config(runs.preset, runs.objective, (2, 2, 2)), devices=jax.devices())
    state = exp.init_state()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        if leaf.size > LARGE:
            assert not leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
    # Equal up to float rounding (the reference was compiled with LLVM -O0, this one -O2).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                 host(state.params), runs.params0)


def test_adam_moments_sharded_like_their_parameters():
    """Optimizer state mirrors the parameter shardings (abstract: nothing is allocated)."""
    for preset, objective in MODELS.values():
        exp = build(config(preset, objective, (2, 4, 1), optimizer={"name": "adamw"}),
                    devices=jax.devices())
        sh = exp.state_shardings()
        params = dict(jax.tree_util.tree_flatten_with_path(sh.params)[0])
        abstract = exp.abstract_state()
        sizes = {p: leaf.size for p, leaf in jax.tree_util.tree_flatten_with_path(abstract.params)[0]}
        moments = 0
        for path, s in jax.tree_util.tree_flatten_with_path(sh.opt_state)[0]:
            names = [getattr(k, "name", None) for k in path]
            if "mu" in names or "nu" in names:
                tail = tuple(k for k in path if isinstance(k, jax.tree_util.DictKey))
                matches = [p for p in params if tuple(p) == tail]
                assert len(matches) == 1, path
                assert s == params[matches[0]], path
                moments += 1
                if sizes[matches[0]] > LARGE:
                    assert not s.is_fully_replicated
        assert moments == 2 * len(params)


# ------------------------------------------------------------------ config errors


@pytest.fixture
def no_compiles():
    """Fail if XLA compiles anything while the test runs (the errors come from build())."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not compiled, f"{len(compiled)} XLA compiles before the ConfigError"


def test_mesh_product_must_equal_device_count(no_compiles):
    with pytest.raises(ConfigError, match=r"mesh.*4 but there are 8 devices"):
        build(config("gpt-tiny", "clm", (2, 2, 1)), devices=jax.devices())
    with pytest.raises(ConfigError, match=r"mesh: fixed axes.*3"):
        parallel.make_mesh(MeshConfig(data=-1, fsdp=3), jax.devices())
    # -1 takes the rest.
    assert parallel.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)


def test_batch_must_divide_over_data_and_fsdp(no_compiles):
    with pytest.raises(ConfigError, match=r"train\.batch_size=6 .*data\*fsdp=4"):
        build(config("gpt-tiny", "clm", (2, 2, 2), train={"batch_size": 6}), devices=jax.devices())
    # With accumulation each micro-batch must divide: 8 / 4 = 2 rows over 4 devices.
    with pytest.raises(ConfigError, match=r"train\.grad_accum=4"):
        build(config("gpt-tiny", "clm", (2, 2, 2), train={"grad_accum": 4}), devices=jax.devices())


def test_objective_must_match_architecture(no_compiles):
    with pytest.raises(ConfigError, match=r"objective 'mlm' needs model\.architecture"):
        build(config("gpt-tiny", "mlm"), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"objective 'span_corruption' needs model\.architecture"):
        build(config("bert-tiny", "span_corruption"), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"objective 'clm' needs model\.architecture"):
        build(config("t5-tiny", "clm"), devices=jax.devices()[:1])


def test_heads_must_divide_tensor(no_compiles):
    with pytest.raises(ConfigError, match=r"model\.num_heads=4 .*mesh\.tensor=8"):
        build(config("gpt-tiny", "clm", (1, 1, 8), model={"num_heads": 4, "head_dim": 16}),
              devices=jax.devices())
    # The logical rules refuse to split heads unevenly too.
    spec = parallel._spec_for(("embed", "heads", "kv"), (64, 8, 8),
                              parallel.make_mesh(MeshConfig(data=1, tensor=8)),
                              parallel.DEFAULT_RULES, "w")
    assert spec == jax.sharding.PartitionSpec(None, "tensor", None)
    with pytest.raises(ConfigError, match="heads"):
        parallel._spec_for(("embed", "heads", "kv"), (64, 4, 8),
                           parallel.make_mesh(MeshConfig(data=1, tensor=8)),
                           parallel.DEFAULT_RULES, "w")


def test_logical_rules_order_and_overrides():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    P = jax.sharding.PartitionSpec
    rules = parallel.DEFAULT_RULES
    assert parallel._spec_for(("vocab", "embed"), (512, 64), mesh, rules, "e") == P("tensor", "fsdp")
    assert parallel._spec_for(("embed", "mlp"), (64, 256), mesh, rules, "w") == P("fsdp", "tensor")
    assert parallel._spec_for(("layers", "embed", "heads", "kv"), (2, 64, 8, 8), mesh, rules,
                              "q") == P(None, "fsdp", "tensor", None)
    custom = parallel.rules_from_config(MeshConfig(rules=[["embed", None], ["mlp", ["fsdp", "tensor"]]]))
    assert parallel._spec_for(("embed", "mlp"), (64, 256), mesh, custom, "w") == P(None, ("fsdp", "tensor"))
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        parallel.rules_from_config(MeshConfig(rules=[["embed", "model"]]))
    # Batches: leading axis over data and fsdp.
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))
