"""LoRA on mixture-of-experts layers -> HF PEFT LoRA on parameters (`target_parameters`).

transformers 5 keeps a layer's experts as fused 3-D parameters of one module `mlp.experts`
(Mixtral, OLMoE, Qwen2/3-MoE alike): `gate_up_proj` [E, 2I, d] (gate rows, then up rows)
and `down_proj` [E, d, I]; the router is the 2-D parameter `mlp.gate.weight` [E, d]. These
are not nn.Linear modules, so PEFT (>= 0.17) adapts them with `LoraConfig.target_parameters`
(lora.ParamWrapper): for a parameter [E, out, in], lora_A.weight is [E*r, in] (rows
e*r..(e+1)*r: expert e's A_e [r, in]) and lora_B.weight [out, r*E], read as [out, r, E];
delta_e = scale * B_e A_e. A 2-D parameter is the E = 1 case (plain Linear layout).

llmjax holds one pair per expert and leaf (peft/lora.py): `mlp/wi_0` a [E, d, r], b [E, r, I]
with delta_e = scale * a_e b_e = W_e^T's update. wi_0 and wi_1 are both halves of
gate_up_proj, so their pairs become one pair of rank r0 + r1: A_e = [a0_e^T; a1_e^T],
B_e = [[b0_e^T, 0], [0, b1_e^T]] (exact: the blocks do not mix).

Several wrapped parameters of one module nest, the first in the module's parameter order
(gate_up_proj, then down_proj) innermost, so its tensors sit under one `base_layer.` per
wrapped parameter after it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import numpy as np

from llmjax.config import ModelConfig
from llmjax.errors import ConversionError

EXPERT_LEAF = re.compile(r"^(.*/layers_(\d+)/mlp/(wi_0|wi_1|wo|router))$")
PARAM_ORDER = ("gate_up_proj", "down_proj")  # transformers' experts module, in this order


class Factors(NamedTuple):
    """One HF LoRA target: a module (n_experts = 1) or a parameter, with A [n, R, in] and
    B [n, out, R] per expert (n = 1 for a Linear or a 2-D parameter)."""

    module: str  # HF module name (model.layers.0.mlp.experts)
    parameter: str  # "" for an nn.Linear target, else the parameter (gate_up_proj)
    a: np.ndarray
    b: np.ndarray


def is_expert_path(cfg: ModelConfig, dense: str) -> bool:
    """Whether an (unstacked) LoRA target path is an MoE expert stack or router."""
    m = EXPERT_LEAF.match(dense)
    return bool(m and cfg.num_experts and cfg.is_moe_layer(int(m.group(2))))


def expert_factors(cfg: ModelConfig, family, pairs: dict[str, tuple]) -> list[Factors]:
    """Factors of the expert and router LoRA pairs {llmjax path: (a, b)} (unstacked paths
    `decoder/layers_i/mlp/wi_0`, a [E, in, r], b [E, r, out]; router a [d, r], b [r, E])."""
    ucfg = dataclasses.replace(cfg, scan_layers=False)
    where = {}  # llmjax path -> (HF parameter, which part of it, number of parts)
    for spec in family.specs(ucfg, family.export_prefix(ucfg)):
        for i, path in enumerate(spec.paths):
            where[path] = (spec.hf[0], i, len(spec.paths))
    grouped: dict[str, dict[int, tuple]] = {}
    for path, (a, b) in pairs.items():
        if path not in where:
            raise ConversionError(f"LoRA target {path!r} has no Hugging Face parameter in "
                                  f"{family.name}")
        name, part, n_parts = where[path]
        if path.endswith("/router"):  # 2-D: one "expert"
            a, b = a[None], b[None]
        grouped.setdefault(name, {})[part] = (np.asarray(a, np.float32),
                                              np.asarray(b, np.float32), n_parts)
    out = []
    for name, parts in grouped.items():
        n_parts = next(iter(parts.values()))[2]
        first = next(iter(parts.values()))
        n, width = first[0].shape[0], first[1].shape[-1]  # experts, output width of a part
        ranks = {p: a.shape[-1] for p, (a, _, _) in parts.items()}
        rank = sum(ranks.values())
        big_a = np.concatenate([parts[p][0].transpose(0, 2, 1) for p in sorted(parts)], axis=1)
        big_b = np.zeros((n, n_parts * width, rank), np.float32)
        offset = 0
        for p in sorted(parts):
            b = parts[p][1]
            big_b[:, p * width:(p + 1) * width, offset:offset + ranks[p]] = b.transpose(0, 2, 1)
            offset += ranks[p]
        module, _, parameter = name.rpartition(".")
        out.append(Factors(module, parameter, big_a, big_b))
    return out


def tensor_names(factors: list[Factors], suffix: str = "") -> list[tuple[str, str]]:
    """(lora_A key, lora_B key) of each target, nesting ParamWrappers as PEFT builds them."""
    wrapped: dict[str, list[str]] = {}
    for f in factors:
        if f.parameter:
            wrapped.setdefault(f.module, []).append(f.parameter)
    names = []
    for f in factors:
        nest = ""
        if f.parameter:
            order = sorted(wrapped[f.module], key=lambda p: (
                PARAM_ORDER.index(p) if p in PARAM_ORDER else len(PARAM_ORDER), p))
            if len(order) > 1 and any(p not in PARAM_ORDER for p in order):
                raise ConversionError(f"LoRA on parameters {order} of {f.module}: their "
                                      f"order in the module is unknown")
            nest = "base_layer." * (len(order) - 1 - order.index(f.parameter))
        stem = f"base_model.model.{f.module}.{nest}"
        names.append((f"{stem}lora_A{suffix}.weight", f"{stem}lora_B{suffix}.weight"))
    return names


def peft_tensors(factors: Factors, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A.weight, lora_B.weight) with the rank zero-padded to `rank` (padding adds
    zero rows to A and zero columns to B: the same delta)."""
    a, b = factors.a, factors.b
    n, r = a.shape[0], a.shape[1]
    a = np.pad(a, ((0, 0), (0, rank - r), (0, 0)))
    b = np.pad(b, ((0, 0), (0, 0), (0, rank - r)))
    return (np.ascontiguousarray(a.reshape(n * rank, a.shape[2])),
            np.ascontiguousarray(b.transpose(1, 2, 0).reshape(b.shape[1], rank * n)))
