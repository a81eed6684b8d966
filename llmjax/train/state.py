"""The train state pytree and its sharded creation."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from llmjax import parallel
from llmjax.tree import tree_names

Params = dict


@struct.dataclass
class TrainState:
    """Everything a step reads and writes. Step keys are fold_in(rng, step)."""

    step: jax.Array
    params: Params  # trainable leaves (base params and PEFT params)
    frozen: Params  # leaves that are not trained: no gradients, no optimizer state
    opt_state: Any
    rng: jax.Array


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
