"""The train state pytree and its sharded creation."""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, PartitionSpec as P

from llmjax import parallel

Params = dict


@struct.dataclass
class TrainState:
    """Everything a step reads and writes. Step keys are fold_in(rng, step)."""

    step: jax.Array
    params: Params  # trainable leaves (base params and PEFT params)
    frozen: Params  # leaves that are not trained: no gradients, no optimizer state
    opt_state: Any
    rng: jax.Array


def flat_names(boxed_abstract: Params) -> dict[tuple, tuple]:
    """{dict path: logical axis names} of a boxed abstract parameter tree."""
    specs = nn.get_partition_spec(boxed_abstract)
    out = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, P))[0]:
        out[tuple(k.key for k in path)] = tuple(spec)
    return out


def tree_names(tree: Params, names: dict[tuple, tuple],
               extra: Optional[Callable[[tuple, tuple], tuple]] = None) -> Any:
    """Logical names for every leaf of `tree`: by path, else `extra(path, shape)`, else none."""
    def one(path, leaf):
        key = tuple(k.key for k in path)
        if key in names and len(names[key]) == len(leaf.shape):
            return P(*names[key])
        if extra is not None:
            found = extra(key, leaf.shape)
            if found is not None:
                return P(*found)
        return P(*([None] * len(leaf.shape)))
    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(abstract: TrainState, names: dict[tuple, tuple], mesh: Mesh, rules,
                    extra=None) -> TrainState:
    """NamedShardings of every part of the state, from the model's logical names."""
    params_sh = parallel.logical_shardings(tree_names(abstract.params, names, extra),
                                           abstract.params, mesh, rules)
    frozen_sh = parallel.logical_shardings(tree_names(abstract.frozen, names, extra),
                                           abstract.frozen, mesh, rules)
    return TrainState(step=parallel.replicated(mesh), params=params_sh, frozen=frozen_sh,
                      opt_state=parallel.mirror_shardings(abstract.opt_state, abstract.params,
                                                          params_sh, mesh),
                      rng=parallel.replicated(mesh))


def new_state(params: Params, frozen: Params, tx, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                      opt_state=tx.init(params), rng=rng)
