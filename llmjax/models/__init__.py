"""Transformer models: one implementation, five families (see configs/models/)."""
from llmjax.models.api import (abstract_params, dummy_inputs, init_params, logical_axes,
                               param_count)
from llmjax.models.transformer import Transformer
from llmjax.tree import stack_layers, unstack_layers

__all__ = ["Transformer", "abstract_params", "dummy_inputs", "init_params", "logical_axes",
           "param_count", "stack_layers", "unstack_layers"]
