"""LoRA: W + scale * A B on kernels chosen by regex, as a parameter-tree transform.

For a base kernel at path P with shape [in..., out...] the PEFT leaves are
P/lora_a [in..., r] (random normal, std 1/sqrt(fan_in)) and P/lora_b [r, out...]
(zeros, so the model starts unchanged); kernels of scanned stacks carry the
leading layer axis on both. scale = alpha / r, or alpha / sqrt(r) with rsLoRA.
The delta is added to W inside the jitted step (one small matmul per target per
step); `merge_lora` folds it in for export and `unmerge_lora` takes it out.
Dropout on the LoRA input is not supported (see PeftConfig.lora_dropout).

Mixture-of-experts layers (llmjax/models/moe.py) hold their experts as stacked leaves, not
Dense kernels: `mlp/wi_0`, `mlp/wi_1` [E, d, f], `mlp/wo` [E, f, d], and the router
`mlp/router` [d, E]. The same regex selects them (e.g. peft.targets='mlp/(wi_0|wi_1|wo)');
an expert stack gets one low-rank pair per expert, P/lora_a [E, in, r] and P/lora_b
[E, r, out] (delta_e = scale * A_e B_e), so the pairs carry the expert axis and shard
over the `expert` mesh axis like the experts; the router is adapted like a kernel.
"""
from __future__ import annotations

import math
import re
import string
from typing import Any, Optional

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError
from llmjax.peft.config import PeftConfig
from llmjax.peft.methods import Method, register
from llmjax.tree import flatten_parts, is_scanned, path_str, unflatten_parts

DEFAULT_TARGETS = r"attention/(query|value)/"
A, B = "lora_a", "lora_b"
EXPERT_STACKS = ("wi_0", "wi_1", "wo")  # MoE expert leaves [E, in, out] (no `kernel` below)
ROUTER = "router"  # the MoE router [d_model, E], adapted like a kernel
ADAPTED = ("kernel", ROUTER) + EXPERT_STACKS  # leaf names LoRA can adapt


def lora_scale(cfg: PeftConfig, rank: int) -> float:
    return cfg.alpha / (math.sqrt(rank) if cfg.rslora else rank)


def in_dims(path: tuple, kernel_ndim: int) -> int:
    """How many leading kernel dims (after a layer axis) are inputs: attention `out`
    kernels are [heads, kv, embed] (2), every other Dense has one input dim."""
    return 2 if path[-2] == "out" and kernel_ndim == 3 else 1


def is_expert_stack(path: tuple) -> bool:
    """An MoE layer's stacked expert weights (`.../mlp/wi_0`), not a Dense kernel."""
    return path[-1] in EXPERT_STACKS


def _split_dims(path: tuple, shape: tuple) -> tuple[int, int, int]:
    """(leading batch dims: layer and expert axes, input dims, output dims) of a kernel or
    an expert stack."""
    lead = (1 if is_scanned(path) else 0) + (1 if is_expert_stack(path) else 0)
    n_in = in_dims(path, len(shape) - lead)
    return lead, n_in, len(shape) - lead - n_in


def _adaptable(path: tuple) -> bool:
    """A leaf LoRA can adapt: a Dense kernel, an MoE expert stack or the router."""
    return path[-1] in ADAPTED


def _is_lora_leaf(path: tuple) -> bool:
    return len(path) > 1 and path[-1] in (A, B) and path[-2] in ADAPTED


def lora_delta(a: jax.Array, b: jax.Array, scale: float, lead: int) -> jax.Array:
    """scale * a @ b contracting the rank: [L?, in..., r] x [L?, r, out...] -> [L?, in..., out...]."""
    letters = iter(string.ascii_lowercase.replace("z", ""))
    layer = "".join(next(letters) for _ in range(lead))
    ins = "".join(next(letters) for _ in range(a.ndim - lead - 1))
    outs = "".join(next(letters) for _ in range(b.ndim - lead - 1))
    delta = jnp.einsum(f"{layer}{ins}z,{layer}z{outs}->{layer}{ins}{outs}", a, b,
                       preferred_element_type=jnp.float32)
    return delta * scale


@register("lora")
class Lora(Method):
    """Low-rank adapters on the kernels matching peft.targets (default attention query/value)."""

    def __init__(self, cfg: PeftConfig):
        super().__init__(cfg)
        self.targets = re.compile(cfg.targets or DEFAULT_TARGETS)

    def is_target(self, path: tuple) -> bool:
        return _adaptable(path) and bool(self.targets.search(path_str(path)))

    def init(self, flat: dict, rng: jax.Array) -> dict:
        peft = {}
        kernels = [p for p in flat if self.is_target(p)]
        if not kernels:
            raise ConfigError(f"peft.targets={self.targets.pattern!r} matches no kernel; "
                              f"kernels look like 'decoder/layers/attention/query/kernel' "
                              f"(MoE experts 'decoder/layers/mlp/wi_0', router "
                              f"'decoder/layers/mlp/router')")
        r = self.cfg.rank
        for i, path in enumerate(kernels):
            w = flat[path]
            lead, n_in, _ = _split_dims(path, w.shape)
            in_shape, out_shape = w.shape[lead:lead + n_in], w.shape[lead + n_in:]
            layers = w.shape[:lead]  # layer and expert axes: one pair per layer and expert
            fan_in = math.prod(in_shape)
            a = jax.random.normal(jax.random.fold_in(rng, i), layers + in_shape + (r,),
                                  jnp.float32) / math.sqrt(fan_in)
            peft[path + (A,)] = a.astype(w.dtype)
            peft[path + (B,)] = jnp.zeros(layers + (r,) + out_shape, w.dtype)
        return peft

    def owns(self, path: tuple) -> bool:
        return _is_lora_leaf(path)

    def apply(self, flat: dict, peft: dict) -> dict:
        return _add_deltas(flat, peft, self.cfg, sign=1.0)

    def axes(self, path: tuple, shape: tuple, names: dict) -> Optional[tuple]:
        base = names.get(path[:-1])
        if base is None:
            return None
        lead, n_in, _ = _split_dims(path[:-1], tuple(base))
        layer, ins, outs = base[:lead], base[lead:lead + n_in], base[lead + n_in:]
        return layer + ins + ("lora",) if path[-1] == A else layer + ("lora",) + outs


def _add_deltas(flat: dict, peft: dict, cfg: PeftConfig, sign: float) -> dict:
    flat = dict(flat)
    for path, a in peft.items():
        if path[-1] != A or not _is_lora_leaf(path):
            continue
        kernel_path = path[:-1]
        b = peft[kernel_path + (B,)]
        w = flat[kernel_path]
        lead, _, _ = _split_dims(kernel_path, w.shape)
        delta = lora_delta(a, b, lora_scale(cfg, a.shape[-1]), lead)
        flat[kernel_path] = (w.astype(jnp.float32) + sign * delta).astype(w.dtype)
    return flat


def lora_leaves(tree: Any) -> dict:
    """The LoRA leaves of a tree (flat), e.g. of TrainState.params or an adapter checkpoint."""
    return {p: v for p, v in flatten_parts(tree).items() if _is_lora_leaf(p)}


def merge_lora(params: Any, peft_params: Any, cfg: PeftConfig) -> dict:
    """Base params with W += scale * A B for every LoRA pair in `peft_params`."""
    return unflatten_parts(_add_deltas(flatten_parts(params), lora_leaves(peft_params), cfg, 1.0))


def unmerge_lora(params: Any, peft_params: Any, cfg: PeftConfig) -> dict:
    """Inverse of merge_lora: W -= scale * A B (restores the base up to float rounding)."""
    return unflatten_parts(_add_deltas(flatten_parts(params), lora_leaves(peft_params), cfg, -1.0))
