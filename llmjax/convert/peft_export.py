"""LoRA parameters -> the HF-PEFT adapter format (adapter_config.json + adapter_model.safetensors).

llmjax LoRA tree: for a base kernel at path P with shape [in..., out...],
`P/lora_a` [in..., r] and `P/lora_b` [r, out...] (P may end in `/kernel` or
name the Dense), delta = scale * a @ b with scale = alpha / r (alpha / sqrt(r)
with rslora). HF-PEFT stores, per nn.Linear (weight [out, in]), lora_A [r, in]
and lora_B [out, r] with delta = scale * B @ A: so A = a.reshape(in, r).T and
B = b.reshape(r, out).T. Layers may be scanned (`layers`) or unrolled (`layers_i`).
MoE experts and routers are parameters, not nn.Linear modules: llmjax/convert/peft_experts.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from llmjax.config import ModelConfig
from llmjax.convert.hf import family_of_config
from llmjax.errors import ConversionError
from llmjax.convert.peft_experts import Factors, expert_factors, is_expert_path, peft_tensors, \
    tensor_names
from llmjax.convert.safetensors_io import write_safetensors
from llmjax.tree import flatten, stack_layers, unflatten, unstack_layers

TASK_TYPES = {"decoder": "CAUSAL_LM", "encoder_decoder": "SEQ_2_SEQ_LM", "encoder": None}


def _hf_linear_names(cfg: ModelConfig) -> dict[str, str]:
    """llmjax Dense path (unscanned, without /kernel) -> HF nn.Linear module name."""
    family = family_of_config(cfg)
    if family.name == "gpt2":
        raise ConversionError("LoRA export for GPT-2 is not supported: its fused Conv1D c_attn "
                              "has no per-projection HF-PEFT target")
    ucfg = dataclasses.replace(cfg, scan_layers=False)
    names = {}
    for spec in family.specs(ucfg, family.export_prefix(ucfg)):
        if len(spec.paths) == 1 and spec.paths[0].endswith("/kernel") and len(spec.hf_shape) == 2:
            names[spec.paths[0][: -len("/kernel")]] = spec.hf[0][: -len(".weight")]
    return names


def lora_factors(cfg: ModelConfig, lora: dict) -> tuple[list[Factors], int]:
    """Every LoRA pair as HF-PEFT factors (Linear modules, and MoE expert / router
    parameters: llmjax/convert/peft_experts.py), and the llmjax rank they share."""
    flat = flatten(unstack_layers(jax.tree.map(np.asarray, dict(lora))))
    family = family_of_config(cfg)
    names = None
    factors, experts, ranks = [], {}, set()
    for path, a in flat.items():
        if not path.endswith("/lora_a"):
            continue
        base = path[: -len("/lora_a")]
        if f"{base}/lora_b" not in flat:
            raise ConversionError(f"LoRA tensor {base + '/lora_b'!r} is missing (beside {path!r})")
        b = flat[f"{base}/lora_b"]
        r = a.shape[-1]
        ranks.add(r)
        if is_expert_path(cfg, base):
            if b.shape[-2] != r:
                raise ConversionError(f"LoRA {base!r}: lora_a rank {r} != lora_b rank "
                                      f"{b.shape[-2]}")
            experts[base] = (a, b)
            continue
        dense = base[: -len("/kernel")] if base.endswith("/kernel") else base
        names = _hf_linear_names(cfg) if names is None else names
        if dense not in names:
            raise ConversionError(f"LoRA target {dense!r} has no Hugging Face nn.Linear "
                                  f"counterpart in {family.name}")
        if b.shape[0] != r:
            raise ConversionError(f"LoRA {base!r}: lora_a rank {r} != lora_b rank {b.shape[0]}")
        n_in, n_out = math.prod(a.shape[:-1]), math.prod(b.shape[1:])
        factors.append(Factors(names[dense], "",
                               np.asarray(a, np.float32).reshape(n_in, r).T[None],
                               np.asarray(b, np.float32).reshape(r, n_out).T[None]))
    if experts:
        factors += expert_factors(cfg, family, experts)
    if not factors:
        raise ConversionError("no LoRA parameters (paths ending in /lora_a) in the tree")
    if len(ranks) != 1:
        raise ConversionError(f"LoRA ranks {sorted(ranks)} (expected one rank)")
    return factors, ranks.pop()


def _tensors(factors: list[Factors], suffix: str = "") -> dict:
    """HF-PEFT tensors, every target at the largest rank (zero-padded: the same deltas)."""
    rank = max(f.a.shape[1] for f in factors)
    out = {}
    for f, (key_a, key_b) in zip(factors, tensor_names(factors, suffix)):
        out[key_a], out[key_b] = peft_tensors(f, rank)
    return out


def lora_to_peft_tensors(cfg: ModelConfig, lora: dict, adapter_name: str = "") -> dict:
    """HF-PEFT tensor dict (base_model.model.<module>.lora_A.weight ...) of an llmjax LoRA tree."""
    factors, _ = lora_factors(cfg, lora)
    return _tensors(factors, f".{adapter_name}" if adapter_name else "")


def export_lora(out_dir: str | os.PathLike, cfg: ModelConfig, lora: dict, alpha: float,
                rank: Optional[int] = None, rslora: bool = False, dropout: float = 0.0,
                base_model_name_or_path: str = "") -> Path:
    """Write an HF-PEFT LoRA adapter directory that `peft.PeftModel.from_pretrained` loads.

    MoE experts and routers become `target_parameters` (PEFT >= 0.17 on transformers >= 5's
    fused expert parameters). Their gate and up pairs join into one pair of twice the rank;
    then every target is written at that rank (zero-padded) with lora_alpha scaled so that
    alpha / r (alpha / sqrt(r) with rslora) is unchanged: the deltas are exactly llmjax's."""
    factors, r = lora_factors(cfg, lora)
    if rank is not None and r != rank:
        raise ConversionError(f"LoRA ranks [{r}] (expected one rank = {rank})")
    width = max(f.a.shape[1] for f in factors)
    tensors = _tensors(factors)
    modules = sorted({f.module for f in factors if not f.parameter})
    parameters = sorted(f"{f.module}.{f.parameter}" for f in factors if f.parameter)
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[cfg.architecture], "r": width,
        "lora_alpha": alpha * (math.sqrt(width / r) if rslora else width / r),
        "lora_dropout": dropout, "use_rslora": rslora, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": ("^(" + "|".join(re.escape(m) for m in modules) + ")$"
                           if modules else []),
        "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
    }
    if parameters:
        if dropout:
            raise ConversionError("HF PEFT LoRA on parameters (MoE experts) needs "
                                  "lora_dropout=0")
        config["target_parameters"] = parameters
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(out / "adapter_model.safetensors", tensors)
    return out


def merge_lora(params: dict, lora: dict, alpha: float, rslora: bool = False) -> dict:
    """params with every LoRA delta added to its kernel (a reference merge, for checks)."""
    scanned = any(k.endswith("/layers") or "/layers/" in k for k in flatten(dict(params)))
    flat = flatten(unstack_layers(jax.tree.map(np.asarray, dict(params))))
    flat_lora = flatten(unstack_layers(jax.tree.map(np.asarray, dict(lora))))
    for path, a in flat_lora.items():
        if not path.endswith("/lora_a"):
            continue
        base = path[: -len("/lora_a")]
        b = flat_lora[f"{base}/lora_b"]
        kernel = base if base.endswith("/kernel") or base in flat else f"{base}/kernel"
        r = a.shape[-1]
        scale = alpha / (math.sqrt(r) if rslora else r)
        if base.rsplit("/", 1)[-1] in ("wi_0", "wi_1", "wo") and base in flat:  # MoE experts
            delta = np.matmul(a, b)  # per expert: [E, in, r] @ [E, r, out]
        else:
            delta = np.tensordot(a, b, axes=([a.ndim - 1], [0]))
        flat[kernel] = flat[kernel] + scale * delta
    merged = unflatten(flat)
    return stack_layers(merged) if scanned else merged
