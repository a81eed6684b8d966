"""RoPE base and scaling: HF config.json <-> ModelConfig fields (LLaMA-like families).

HF writes them two ways: transformers < 5 a top-level `rope_theta` and a `rope_scaling` dict
(`type` or `rope_type`, `factor`, ...); transformers >= 5 one `rope_parameters` dict with
`rope_theta` inside. Both are read (rope_scaling first, as transformers does) and both are
written, so either version loads an export. Types llmjax does not implement (longrope,
...) are a ConversionError naming the type.
"""
from __future__ import annotations

import math
from typing import Any

from llmjax.config import ModelConfig
from llmjax.errors import ConversionError

# HF rope_type -> model.rope_scaling
HF_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3",
            "yarn": "yarn"}


def _number(value: Any, key: str, kind: str) -> float:
    """A field of the (untrusted) config.json that must be a positive number."""
    if value is None:
        raise ConversionError(f"config.json field {key!r} is missing: rope_type={kind!r} "
                              f"needs it")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConversionError(f"config.json field {key!r}={value!r} is not a positive number")
    return value


def rope_fields(hf: dict, family: str) -> dict[str, Any]:
    """ModelConfig keyword arguments (rope_theta, rope_scaling, ...) of an HF config; with
    dynamic NTK also max_len (HF's max_position_embeddings is then the original length)."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in HF_TYPES:
        raise ConversionError(f"config.json field 'rope_scaling' has rope_type={kind!r}, which "
                              f"llmjax does not implement for {family}; supported: "
                              f"{sorted(HF_TYPES)}")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"config.json field 'partial_rotary_factor'={partial!r} is not "
                              f"supported for {family}: llmjax rotates every head feature")
    theta = _number(rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta", kind)
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": HF_TYPES[kind]}
    if kind == "default":
        return out
    out["rope_scaling_factor"] = float(_number(rope.get("factor"), "rope_scaling.factor", kind))
    if kind == "linear":
        return out
    if kind == "dynamic":  # transformers measures dynamic NTK against max_position_embeddings
        original = int(_number(hf.get("max_position_embeddings", 2048),
                               "max_position_embeddings", kind))
        # ... and runs past it: the longest sequence is the stretched one (KV cache, generate)
        out.update(rope_original_max_len=original,
                   max_len=int(original * out["rope_scaling_factor"]))
        return out
    # llama3, yarn: as transformers, a top-level original_max_position_embeddings wins (Phi-3),
    # then the one in rope_scaling, then max_position_embeddings
    original = hf.get("original_max_position_embeddings",
                      rope.get("original_max_position_embeddings",
                               hf.get("max_position_embeddings", 2048)))
    out["rope_original_max_len"] = int(_number(
        original, "rope_scaling.original_max_position_embeddings", kind))
    if kind == "llama3":
        for ours, theirs in (("rope_low_freq_factor", "low_freq_factor"),
                             ("rope_high_freq_factor", "high_freq_factor")):
            out[ours] = float(_number(rope.get(theirs), f"rope_scaling.{theirs}", kind))
    else:
        out.update(_yarn_fields(rope, out["rope_scaling_factor"], family))
    return out


def _yarn_fields(rope: dict, factor: float, family: str) -> dict[str, Any]:
    if rope.get("truncate", True) is not True:
        raise ConversionError(f"config.json field 'rope_scaling.truncate'="
                              f"{rope['truncate']!r} is not supported for {family}: llmjax's "
                              f"yarn rounds the ramp ends as transformers does by default")
    out = {f"rope_yarn_{beta}": float(_number(rope.get(beta) or default, f"rope_scaling.{beta}",
                                              "yarn"))
           for beta, default in (("beta_fast", 32.0), ("beta_slow", 1.0))}
    attention = rope.get("attention_factor")
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention is None and mscale and mscale_all:  # DeepSeek's form, folded to its value

        def get_mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        attention = get_mscale(_number(mscale, "rope_scaling.mscale", "yarn")) / get_mscale(
            _number(mscale_all, "rope_scaling.mscale_all_dim", "yarn"))
    if attention is not None:
        out["rope_attention_factor"] = float(_number(attention, "rope_scaling.attention_factor",
                                                     "yarn"))
    return out


def hf_rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields for cfg's RoPE: rope_theta, rope_parameters (transformers >= 5) and
    rope_scaling (older), and for dynamic NTK max_position_embeddings = the original length
    (the length transformers scales against)."""
    scaling: dict[str, Any] = {}
    kind = {v: k for k, v in HF_TYPES.items()}[cfg.rope_scaling]
    if kind != "default":
        scaling = {"rope_type": kind, "factor": cfg.rope_scaling_factor}
    if kind == "llama3":
        scaling.update(original_max_position_embeddings=cfg.rope_original_len,
                       low_freq_factor=cfg.rope_low_freq_factor,
                       high_freq_factor=cfg.rope_high_freq_factor)
    if kind == "yarn":
        scaling.update(original_max_position_embeddings=cfg.rope_original_len,
                       beta_fast=cfg.rope_yarn_beta_fast, beta_slow=cfg.rope_yarn_beta_slow)
        if cfg.rope_attention_factor is not None:
            scaling["attention_factor"] = cfg.rope_attention_factor
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta,
                           "rope_parameters": {"rope_type": kind, "rope_theta": cfg.rope_theta,
                                               **scaling}}
    if scaling:
        out["rope_scaling"] = scaling
    if kind == "dynamic":
        out["max_position_embeddings"] = cfg.rope_original_len
    return out
