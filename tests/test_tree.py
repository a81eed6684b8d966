"""llmjax/tree.py, the parameter tree's one dialect, against expectations written here:
literal keys and nested dicts for flatten / unflatten, an unrolled model's own parameter
paths and the scanned values sliced by hand for stack / unstack, and the names each
parameter box of every tiny preset declares for logical names."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llmjax import tree
from llmjax.config import model_config, preset_names
from llmjax.models import Transformer, abstract_params, dummy_inputs

TINY = tuple(name for name in preset_names() if name.endswith("-tiny"))


def test_tiny_presets_are_the_five_families_and_moe():
    assert set(TINY) == {"gpt-tiny", "palm-tiny", "llama-tiny", "bert-tiny", "t5-tiny",
                         "moe-tiny"}


# ---------------------------------------------------------------- keys, flat views

NESTED = {"decoder": {"layers": {"mlp": {"wi": {"kernel": 1, "bias": 2}}},
                      "final_norm": {"scale": 3}},
          "embed": {"token": {"embedding": 4}}}
FLAT = {"decoder/layers/mlp/wi/bias": 2, "decoder/layers/mlp/wi/kernel": 1,
        "decoder/final_norm/scale": 3, "embed/token/embedding": 4}


def test_flatten_gives_slash_keys_and_unflatten_the_nested_dicts():
    assert tree.flatten(NESTED) == FLAT
    assert tree.unflatten(FLAT) == NESTED
    assert tree.unflatten(tree.flatten(NESTED)) == NESTED
    assert tree.flatten(tree.unflatten(FLAT)) == FLAT
    assert tree.flatten({}) == {} and tree.unflatten({}) == {}


def test_flatten_walks_any_pytree_and_numeric_parts_stay_strings():
    opt_state = ({"count": 0}, [{"mu": {"w": 1}}, {"nu": {"w": 2}}])
    flat = tree.flatten({"opt_state": opt_state, "empty": {}, "none": None})
    assert flat == {"opt_state/0/count": 0, "opt_state/1/0/mu/w": 1, "opt_state/1/1/nu/w": 2}
    assert tree.unflatten(flat) == {"opt_state": {"0": {"count": 0},
                                                  "1": {"0": {"mu": {"w": 1}},
                                                        "1": {"nu": {"w": 2}}}}}


def test_flatten_is_leaf_stops_at_chosen_nodes():
    box = nn.Partitioned(np.zeros((2, 3)), names=("embed", "mlp"))
    flat = tree.flatten({"a": {"kernel": box}}, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert list(flat) == ["a/kernel"] and flat["a/kernel"] is box


def test_path_str_of_jax_key_paths_and_name_tuples():
    keys = [path for path, _ in jax.tree_util.tree_flatten_with_path({"a": [{"b": 1}]})[0]]
    assert [tree.path_str(k) for k in keys] == ["a/0/b"]
    assert tree.path_str(("decoder", "layers_3", "mlp")) == "decoder/layers_3/mlp"
    assert tree.path_str((jax.tree_util.GetAttrKey("value"),)) == "value"
    assert tree.parts("decoder/layers_3/mlp") == ("decoder", "layers_3", "mlp")


def test_part_views_are_the_same_paths_in_the_trees_own_order():
    flat = tree.flatten_parts(NESTED)
    assert list(flat) == [("decoder", "layers", "mlp", "wi", "kernel"),
                          ("decoder", "layers", "mlp", "wi", "bias"),
                          ("decoder", "final_norm", "scale"), ("embed", "token", "embedding")]
    assert flat == {tree.parts(k): v for k, v in tree.flatten(NESTED).items()}
    assert tree.unflatten_parts(flat) == NESTED
    assert tree.flatten_parts({}) == {} and tree.unflatten_parts({}) == {}
    assert tree.is_scanned(("decoder", "layers", "mlp")) and not tree.is_scanned(("decoder",))


# ---------------------------------------------------------------- scanned layers

def _filled(cfg, seed=0):
    """Concrete parameters of `cfg`: distinct numbers in every leaf (no init compile)."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                        nn.unbox(abstract_params(cfg)))


@pytest.mark.parametrize("name", TINY)
def test_unstack_gives_the_unrolled_models_paths_and_the_scanned_slices(name):
    scanned_cfg = model_config(name, scan_layers=True)
    n = scanned_cfg.num_layers
    scanned = tree.flatten(_filled(scanned_cfg))
    unrolled = {k: tuple(v.shape) for k, v in tree.flatten(nn.unbox(abstract_params(
        model_config(name, scan_layers=False)))).items()}
    # each scanned leaf .../layers/... is layer i's .../layers_i/... with its first axis gone
    expected = {}
    for key, value in scanned.items():
        if "/layers/" in key:
            assert value.shape[0] == n, key
            for i in range(n):
                expected[key.replace("/layers/", f"/layers_{i}/")] = value[i]
        else:
            expected[key] = value
    assert {k: tuple(v.shape) for k, v in expected.items()} == unrolled

    unstacked = tree.flatten(tree.unstack_layers(tree.unflatten(scanned)))
    assert set(unstacked) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(unstacked[key]), value, err_msg=key)

    restacked = tree.flatten(tree.stack_layers(tree.unflatten(unstacked)))
    assert set(restacked) == set(scanned)
    for key, value in scanned.items():
        np.testing.assert_array_equal(np.asarray(restacked[key]), value, err_msg=key)


def test_stack_layers_orders_layers_by_number_not_by_name():
    layers = {f"layers_{i}": {"w": np.full((2,), i)} for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)}
    stacked = tree.stack_layers({"decoder": layers})
    np.testing.assert_array_equal(np.asarray(stacked["decoder"]["layers"]["w"][:, 0]),
                                  np.arange(11))


# ---------------------------------------------------------------- logical names

def _declared(boxed) -> dict[str, tuple]:
    """{key: names} read off each nn.Partitioned box the model created."""
    out = {}
    for path, box in jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        assert isinstance(box, nn.Partitioned), jax.tree_util.keystr(path)
        out["/".join(k.key for k in path)] = tuple(box.names)
    return out


@pytest.mark.parametrize("name", TINY)
def test_logical_names_of_every_leaf_are_what_the_model_declares(name):
    boxed = abstract_params(model_config(name))
    declared = _declared(boxed)
    names = {"/".join(k): v for k, v in tree.logical_names(boxed).items()}
    assert names == declared
    shapes = tree.flatten(nn.unbox(boxed))
    assert set(shapes) == set(names)
    for key, shape in shapes.items():
        assert len(names[key]) == len(shape.shape), key
        assert (names[key][0] == "layers") == ("/layers/" in key), key
    # the tree of PartitionSpecs a state's shardings start from
    specs = tree.flatten(tree.tree_names(nn.unbox(boxed), tree.logical_names(boxed)),
                         is_leaf=lambda x: isinstance(x, P))
    assert specs == {k: P(*v) for k, v in declared.items()}
    # an unrolled layer declares the scanned leaf's names without the layer axis
    unrolled = _declared(abstract_params(model_config(name, scan_layers=False)))
    for key, value in declared.items():
        if "/layers/" in key:
            assert unrolled[key.replace("/layers/", "/layers_0/")] == value[1:], key


def test_logical_names_spot_checks():
    gpt = {"/".join(k): v for k, v in tree.logical_names(
        abstract_params(model_config("gpt-tiny"))).items()}
    assert gpt["decoder/layers/attention/query/kernel"] == ("layers", "embed", "heads", "kv")
    assert gpt["embed/token/embedding"] == ("vocab", "embed")
    bert = {"/".join(k): v for k, v in tree.logical_names(
        abstract_params(model_config("bert-tiny"))).items()}
    assert bert["embed/token_type/embedding"] == ("token_types", "embed")


def test_tree_names_falls_back_to_extra_then_to_no_names():
    names = {("a", "kernel"): ("embed", "mlp")}
    shapes = {"a": {"kernel": np.zeros((2, 3)), "lora_a": np.zeros((2, 1))}, "b": np.zeros(4)}
    extra = lambda path, shape: ("embed", "lora") if path[-1] == "lora_a" else None  # noqa: E731
    got = tree.flatten(tree.tree_names(shapes, names, extra), is_leaf=lambda x: isinstance(x, P))
    assert got == {"a/kernel": P("embed", "mlp"), "a/lora_a": P("embed", "lora"),
                   "b": P(None)}


# ---------------------------------------------------------------- abstract init

def test_abstract_variables_match_a_concrete_init():
    cfg = model_config("gpt-tiny")
    module = Transformer(cfg)
    abstract = tree.abstract_variables(module, **dummy_inputs(cfg))
    concrete = tree.init_variables(module, jax.random.key(3), **dummy_inputs(cfg))
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete)):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (c.shape, c.dtype)
    assert set(tree.flatten(abstract["params"])) == set(tree.flatten(abstract_params(cfg)))
