"""LoRA parameters -> the HF-PEFT adapter format (adapter_config.json + adapter_model.safetensors).

llmjax LoRA tree: for a base kernel at path P with shape [in..., out...],
`P/lora_a` [in..., r] and `P/lora_b` [r, out...] (P may end in `/kernel` or
name the Dense), delta = scale * a @ b with scale = alpha / r (alpha / sqrt(r)
with rslora). HF-PEFT stores, per nn.Linear (weight [out, in]), lora_A [r, in]
and lora_B [out, r] with delta = scale * B @ A: so A = a.reshape(in, r).T and
B = b.reshape(r, out).T. Layers may be scanned (`layers`) or unrolled (`layers_i`).
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


def lora_to_peft_tensors(cfg: ModelConfig, lora: dict, adapter_name: str = "") -> dict:
    """HF-PEFT tensor dict (base_model.model.<module>.lora_A.weight ...) of an llmjax LoRA tree."""
    flat = flatten(unstack_layers(jax.tree.map(np.asarray, dict(lora))))
    names = _hf_linear_names(cfg)
    out = {}
    suffix = f".{adapter_name}" if adapter_name else ""
    for path, a in flat.items():
        if not path.endswith("/lora_a"):
            continue
        base = path[: -len("/lora_a")]
        if f"{base}/lora_b" not in flat:
            raise ConversionError(f"LoRA tensor {base + '/lora_b'!r} is missing (beside {path!r})")
        b = flat[f"{base}/lora_b"]
        dense = base[: -len("/kernel")] if base.endswith("/kernel") else base
        if dense not in names:
            raise ConversionError(f"LoRA target {dense!r} has no Hugging Face nn.Linear "
                                  f"counterpart in {family_of_config(cfg).name}")
        r = a.shape[-1]
        if b.shape[0] != r:
            raise ConversionError(f"LoRA {base!r}: lora_a rank {r} != lora_b rank {b.shape[0]}")
        n_in, n_out = math.prod(a.shape[:-1]), math.prod(b.shape[1:])
        module = names[dense]
        out[f"base_model.model.{module}.lora_A{suffix}.weight"] = (
            np.asarray(a, np.float32).reshape(n_in, r).T)
        out[f"base_model.model.{module}.lora_B{suffix}.weight"] = (
            np.asarray(b, np.float32).reshape(r, n_out).T)
    if not out:
        raise ConversionError("no LoRA parameters (paths ending in /lora_a) in the tree")
    return out


def export_lora(out_dir: str | os.PathLike, cfg: ModelConfig, lora: dict, alpha: float,
                rank: Optional[int] = None, rslora: bool = False, dropout: float = 0.0,
                base_model_name_or_path: str = "") -> Path:
    """Write an HF-PEFT LoRA adapter directory that `peft.PeftModel.from_pretrained` loads."""
    tensors = lora_to_peft_tensors(cfg, lora)
    ranks = {t.shape[0] for k, t in tensors.items() if ".lora_A" in k}
    if len(ranks) != 1 or (rank is not None and ranks != {rank}):
        raise ConversionError(f"LoRA ranks {sorted(ranks)} (expected one rank"
                              f"{'' if rank is None else f' = {rank}'})")
    modules = sorted({k[len("base_model.model."): k.index(".lora_A")] for k in tensors
                      if ".lora_A" in k})
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[cfg.architecture], "r": ranks.pop(),
        "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$",
        "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
    }
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
        kernel = base if base.endswith("/kernel") else f"{base}/kernel"
        r = a.shape[-1]
        scale = alpha / (math.sqrt(r) if rslora else r)
        flat[kernel] = flat[kernel] + scale * np.tensordot(a, b, axes=([a.ndim - 1], [0]))
    merged = unflatten(flat)
    return stack_layers(merged) if scanned else merged
