"""IA3: learned vectors scaling keys, values and the MLP intermediate, as a tree transform.

Scaling an activation by a vector l is scaling the weights that make or consume it:
  l * (x W + b) = x (W diag l) + l * b        (keys, values: output columns and bias)
  (l * h) W_o   = h (diag l W_o)               (MLP intermediate: wo's input rows)
so IA3 needs no model hook. Vectors start at ones (the model starts unchanged) and
live at <module>/ia3/scale: named `scale`, so weight decay (which would pull them
towards zero, not one) skips them, like norm scales. With RoPE the key scaling acts
before the rotation, as in HF PEFT's IA3 on k_proj.

MoE expert stacks (`mlp/wi_0`, `mlp/wi_1` [E, d, f], `mlp/wo` [E, f, d]: leaves, not
modules with a kernel) are matched by the same module paths (`mlp/wo$` names the dense
MLP's wo and the experts' wo alike) and get one vector per expert, [E, f].
"""
from __future__ import annotations

import re
from typing import Optional

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError
from llmjax.peft.config import PeftConfig
from llmjax.peft.methods import Method, register
from llmjax.tree import is_scanned, path_str

DEFAULT_TARGETS = r"attention/(key|value)$|mlp/wo$"
INPUT_SIDE = ("wo", "out")  # modules whose *input* is the scaled activation
LEAF = ("ia3", "scale")
EXPERT_STACKS = ("wi_0", "wi_1", "wo")  # MoE expert leaves [L?, E, in, out]


def _weight(module: tuple, flat) -> tuple:
    """Path of the weight IA3 scales for `module`: its kernel, or the module itself when it
    is an MoE expert stack (a leaf)."""
    return module if module[-1] in EXPERT_STACKS and module in flat else module + ("kernel",)


def _geometry(module: tuple, kernel_shape: tuple, stacked: bool = False
              ) -> tuple[int, int, bool]:
    """(layer and expert dims, input dims, scale the input side?) of a module's kernel
    (`stacked`: an expert stack, one more leading axis)."""
    lead = (1 if is_scanned(module) else 0) + (1 if stacked else 0)
    n_in = 2 if module[-1] == "out" and len(kernel_shape) - lead == 3 else 1
    return lead, n_in, module[-1] in INPUT_SIDE


@register("ia3")
class Ia3(Method):
    """(IA)^3: rescale keys, values and the MLP intermediate (modules matching peft.targets)."""

    def __init__(self, cfg: PeftConfig):
        super().__init__(cfg)
        self.targets = re.compile(cfg.targets or DEFAULT_TARGETS)

    def init(self, flat: dict, rng: jax.Array) -> dict:
        peft = {}
        for path, w in flat.items():
            stacked = path[-1] in EXPERT_STACKS
            module = path if stacked else path[:-1]
            if not (stacked or path[-1] == "kernel") or \
                    not self.targets.search(path_str(module)):
                continue
            lead, n_in, input_side = _geometry(module, w.shape, stacked)
            dims = w.shape[lead:lead + n_in] if input_side else w.shape[lead + n_in:]
            peft[module + LEAF] = jnp.ones(w.shape[:lead] + dims, w.dtype)
        if not peft:
            raise ConfigError(f"peft.targets={self.targets.pattern!r} matches no module with a "
                              f"kernel; modules look like 'decoder/layers/attention/key'")
        return peft

    def owns(self, path: tuple) -> bool:
        return path[-2:] == LEAF

    def apply(self, flat: dict, peft: dict) -> dict:
        flat = dict(flat)
        for path, scale in peft.items():
            if path[-2:] != LEAF:
                continue
            module = path[:-2]
            weight = _weight(module, flat)
            w = flat[weight]
            lead, n_in, input_side = _geometry(module, w.shape, weight == module)
            n_out = w.ndim - lead - n_in
            s = scale.astype(jnp.float32)
            if input_side:
                ws = w * s.reshape(s.shape + (1,) * n_out)
            else:
                ws = w * s.reshape(s.shape[:lead] + (1,) * n_in + s.shape[lead:])
                bias = flat.get(module + ("bias",))
                if bias is not None:
                    flat[module + ("bias",)] = (bias * s).astype(bias.dtype)
            flat[weight] = ws.astype(w.dtype)
        return flat

    def axes(self, path: tuple, shape: tuple, names: dict) -> Optional[tuple]:
        module = path[:-2]
        weight = _weight(module, names)
        base = names.get(weight)
        if base is None:
            return None
        lead, n_in, _ = _geometry(module, tuple(base), weight == module)
        dims = base[lead:lead + n_in] if module[-1] in INPUT_SIDE else base[lead + n_in:]
        return tuple(base[:lead]) + tuple(dims)
