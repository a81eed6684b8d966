"""Model-level helpers: init (concrete or abstract), parameter counts, layer (un)stacking."""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
    return Transformer(cfg).init({"params": rng, "dropout": rng}, **dummy_inputs(cfg))


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the (boxed) parameter tree, without allocating it."""
    return jax.eval_shape(functools.partial(_init_variables, cfg), jax.random.key(0))["params"]


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


_LAYERS = re.compile(r"^layers_(\d+)$")


def unstack_layers(params: Params) -> Params:
    """Scanned tree (`.../layers/...` with a leading layer axis) -> `.../layers_i/...`."""
    out = {}
    for key, value in params.items():
        if key == "layers" and isinstance(value, dict):
            n = jax.tree.leaves(value)[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
        elif isinstance(value, dict):
            out[key] = unstack_layers(value)
        else:
            out[key] = value
    return out


def stack_layers(params: Params) -> Params:
    """Inverse of unstack_layers: `.../layers_i/...` -> `.../layers/...` stacked on axis 0."""
    out, layers = {}, {}
    for key, value in params.items():
        match = _LAYERS.match(key)
        if match and isinstance(value, dict):
            layers[int(match.group(1))] = value
        elif isinstance(value, dict):
            out[key] = stack_layers(value)
        else:
            out[key] = value
    if layers:
        ordered = [layers[i] for i in sorted(layers)]
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
    return out
