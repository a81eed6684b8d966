"""Model-level helpers: init (concrete or abstract), parameter counts (layer (un)stacking is
in llmjax/tree.py)."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax import tree
from llmjax.config import ModelConfig
from llmjax.models.transformer import Transformer

Params = dict


def dummy_inputs(cfg: ModelConfig, batch: int = 1, length: int = 8) -> dict[str, jax.Array]:
    """Smallest valid inputs of the model's signature (for init and shape evaluation)."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    inputs = {"tokens": tokens}
    if cfg.architecture == "encoder_decoder":
        inputs["decoder_tokens"] = tokens
    return inputs


def _init_variables(cfg: ModelConfig, rng: jax.Array) -> Any:
    return tree.init_variables(Transformer(cfg), rng, **dummy_inputs(cfg))


def abstract_params(cfg: ModelConfig, boxed: bool = True) -> Params:
    """Shapes and dtypes of the parameter tree, without allocating it: boxed (nn.Partitioned,
    with logical names) or, with boxed=False, plain ShapeDtypeStructs."""
    params = tree.abstract_variables(Transformer(cfg), **dummy_inputs(cfg))["params"]
    return params if boxed else nn.unbox(params)


def logical_axes(cfg: ModelConfig) -> Params:
    """Tree of logical axis names (PartitionSpec of names) matching the parameters."""
    return nn.get_partition_spec(abstract_params(cfg))


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Concrete, unboxed parameters (for tests and small models; sharded init in parallel.py)."""
    return nn.unbox(jax.jit(functools.partial(_init_variables, cfg))(rng)["params"])


def param_count(tree: Params) -> int:
    """Number of scalars in a parameter tree (concrete or abstract, boxed or not)."""
    leaves = jax.tree.leaves(nn.unbox(tree))
    return int(sum(int(np.prod(leaf.shape)) for leaf in leaves))
