"""RoPE inverse frequencies, plain or scaled for long context (model.rope_scaling).

The one place they are built; `layers.rotary` applies them. Each type follows transformers'
`ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py), computed in float32 as it does:

- none:    inv_freq_i = theta ** (-2i / d)
- linear:  inv_freq / factor (the same as dividing positions by factor)
- llama3:  Llama 3.1 bands: wavelengths longer than original/low_freq_factor are divided by
           factor, those shorter than original/high_freq_factor kept, the band between
           interpolated smoothly
- dynamic: NTK-aware: theta is raised to theta * (factor * L / original - (factor - 1)) **
           (d / (d - 2)) where L = max(positions) + 1 of the call, when L > original.
- yarn:    frequencies turning more than beta_fast times over the original length are kept,
           fewer than beta_slow times divided by factor, a linear ramp (over the frequency
           index) between; cos and sin are multiplied by an attention factor
           (`attention_factor`).

Static types are numpy constants folded into the program. Dynamic reads L from the traced
positions, as transformers' `dynamic_rope_update` reads `max(position_ids) + 1` each forward:
shapes stay static under jit, only the base is a traced scalar. transformers caches the
largest base it has seen on the module (a later shorter call above `original` reuses it);
llmjax is stateless, so every call gets the base of its own positions, which is what
transformers gives for that call on a freshly loaded model. Decoding with a KV cache matches
transformers: each step's keys are rotated with the base of that step's length.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig

Array = jax.Array


def _exponents(dim: int) -> np.ndarray:
    """2i / d for i < d/2, float32 (transformers: arange(0, dim, 2).float() / dim)."""
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)


def static_inv_freq(cfg: ModelConfig, dim: int) -> np.ndarray:
    """inv_freq [dim/2] float32 for every type but dynamic (for which: the unscaled one)."""
    inv_freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** _exponents(dim))).astype(
        np.float32)
    kind, factor = cfg.rope_scaling, np.float32(cfg.rope_scaling_factor)
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    if kind == "llama3":
        return _llama3(inv_freq, factor, cfg.rope_original_len, cfg.rope_low_freq_factor,
                       cfg.rope_high_freq_factor)
    if kind == "yarn":
        return _yarn(cfg, dim, factor)
    return inv_freq


def attention_factor(cfg: ModelConfig) -> float:
    """What cos and sin are multiplied by: 1, or yarn's (default 0.1 ln(factor) + 1)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    factor = cfg.rope_scaling_factor
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _llama3(inv_freq: np.ndarray, factor: np.float32, original: int, low: float,
            high: float) -> np.ndarray:
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = ((original / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(cfg: ModelConfig, dim: int, factor: np.float32) -> np.ndarray:
    theta, original = cfg.rope_theta, cfg.rope_original_len

    def correction_dim(rotations: float) -> float:  # the index turning `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(cfg.rope_yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    pos_freqs = (np.float32(theta) ** _exponents(dim)).astype(np.float32)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def inv_freq(cfg: ModelConfig, dim: int, positions: Array) -> Array:
    """The inverse frequencies [dim/2] (float32) for a call over `positions` [b, t]."""
    if cfg.rope_scaling != "dynamic":
        return jnp.asarray(static_inv_freq(cfg, dim))
    original = cfg.rope_original_len
    length = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, float(original))
    factor = cfg.rope_scaling_factor
    base = cfg.rope_theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** jnp.asarray(_exponents(dim)))
