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

import jax
import numpy as np
import pytest

from llmjax import parallel
from llmjax.config import ConfigError, MeshConfig
from llmjax.train.experiment import build
from helpers import MeshRuns, host, sgd_config

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
MODELS = {  # name -> (preset, objective)
    "gpt": ("gpt-tiny", "clm"),
    "t5": ("t5-tiny", "span_corruption"),
}
LARGE = 4096  # elements: a parameter this big must be sharded when fsdp > 1


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
    assert dict(exp.mesh.shape) == {**dict(zip(("data", "fsdp", "tensor"), mesh)), "expert": 1,
                                   "context": 1}
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
    exp = build(sgd_config(runs.preset, runs.objective, (2, 2, 2)), devices=jax.devices())
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
        exp = build(sgd_config(preset, objective, (2, 4, 1), optimizer={"name": "adamw"}),
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


def test_mesh_product_must_equal_device_count(no_compiles):
    with pytest.raises(ConfigError, match=r"mesh.*4 but there are 8 devices"):
        build(sgd_config("gpt-tiny", "clm", (2, 2, 1)), devices=jax.devices())
    with pytest.raises(ConfigError, match=r"mesh: fixed axes.*3"):
        parallel.make_mesh(MeshConfig(data=-1, fsdp=3), jax.devices())
    # -1 takes the rest.
    assert parallel.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 1, 1, 2)


def test_batch_must_divide_over_data_and_fsdp(no_compiles):
    with pytest.raises(ConfigError, match=r"train\.batch_size=6 .*data\*fsdp=4"):
        build(sgd_config("gpt-tiny", "clm", (2, 2, 2), train={"batch_size": 6}),
              devices=jax.devices())
    # With accumulation each micro-batch must divide: 8 / 4 = 2 rows over 4 devices.
    with pytest.raises(ConfigError, match=r"train\.grad_accum=4"):
        build(sgd_config("gpt-tiny", "clm", (2, 2, 2), train={"grad_accum": 4}),
              devices=jax.devices())


def test_objective_must_match_architecture(no_compiles):
    with pytest.raises(ConfigError, match=r"objective 'mlm' needs model\.architecture"):
        build(sgd_config("gpt-tiny", "mlm"), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"objective 'span_corruption' needs model\.architecture"):
        build(sgd_config("bert-tiny", "span_corruption"), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"objective 'clm' needs model\.architecture"):
        build(sgd_config("t5-tiny", "clm"), devices=jax.devices()[:1])


def test_heads_must_divide_tensor(no_compiles):
    with pytest.raises(ConfigError, match=r"model\.num_heads=4 .*mesh\.tensor=8"):
        build(sgd_config("gpt-tiny", "clm", (1, 1, 8), model={"num_heads": 4, "head_dim": 16}),
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
    # Batches: leading axis over data and fsdp (and expert: MoE meshes, tests/test_moe_sharded.py).
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"))
