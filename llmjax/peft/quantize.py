"""QLoRA's frozen base: block-wise NF4 or int8 storage, dequantized inside the jitted step.

A small block-wise quantizer of our own rather than a library: qwix (the maintained JAX
one) quantizes a model's matmuls through interception of Flax modules, which would change
how the one Transformer runs; here the base only has to be *stored* small and rebuilt
before the PEFT merge, which is a parameter-tree transform of a dozen lines (the plan's
`split` quantizes the frozen leaves, its `merge` dequantizes them: model code unchanged).

Layout of a quantized leaf W (shape s, numel n, block b): its path gains two leaves,
  W/qcodes  uint8 s[:-1] + (s[-1] / 2,) for nf4 (two 4-bit codes per byte, in row-major
            order), int8 s for int8: they keep W's leading dims, so they shard like W;
  W/qscale  W's dtype, (n / b,): the absmax of each block of b consecutive elements
            (row-major), the scale of its codes.
NF4 (Dettmers et al. 2023, "QLoRA", appendix E / bitsandbytes): code k stands for
NF4_VALUES[k] * absmax, each element rounded to the nearest value, so
|W - dequantize(quantize(W))| <= absmax * (largest gap between neighbouring values) / 2.
int8: symmetric, round(W / absmax * 127), error <= absmax / 254.
Only kernels, embeddings and MoE expert stacks (`mlp/wi_0|wi_1|wo`, most of an MoE model)
are quantized (>= 2 dims, n divisible by b, even last dim); norms, biases, MoE routers and
anything else stay as they are.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError

CODES, SCALE = "qcodes", "qscale"
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
KINDS = ("nf4", "int8")
QUANTIZED = ("kernel", "embedding", "wi_0", "wi_1", "wo")  # leaf names (wi_*/wo: MoE experts)


def quantizable(path: tuple, shape: tuple, block: int) -> bool:
    n = int(np.prod(shape)) if shape else 0
    return (path[-1] in QUANTIZED and len(shape) >= 2 and n % block == 0
            and shape[-1] % 2 == 0)


def quantize(w: jax.Array, kind: str, block: int) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of one array (see the module docstring for the layout)."""
    x = w.astype(jnp.float32).reshape(-1, block)
    absmax = jnp.max(jnp.abs(x), axis=1)
    safe = jnp.where(absmax > 0, absmax, 1.0)[:, None]
    if kind == "int8":
        codes = jnp.clip(jnp.round(x / safe * 127.0), -127, 127).astype(jnp.int8)
        return codes.reshape(w.shape), absmax.astype(w.dtype)
    if kind != "nf4":
        raise ConfigError(f"peft.base_quantization={kind!r} is not one of {KINDS}")
    values = jnp.asarray(NF4_VALUES)
    # nearest value: count the midpoints below x (values are sorted)
    midpoints = (values[1:] + values[:-1]) / 2
    idx = jnp.sum((x / safe)[..., None] > midpoints, axis=-1).astype(jnp.uint8)
    idx = idx.reshape(w.shape[:-1] + (w.shape[-1] // 2, 2))
    packed = (idx[..., 0] << 4) | idx[..., 1]
    return packed, absmax.astype(w.dtype)


def dequantize(codes: jax.Array, scale: jax.Array, kind: str, block: int) -> jax.Array:
    """The array `quantize` stored, in the scales' dtype."""
    if kind == "int8":
        x = codes.astype(jnp.float32).reshape(-1, block) / 127.0
        shape = codes.shape
    else:
        hi, lo = codes >> 4, codes & 0xF
        idx = jnp.stack([hi, lo], axis=-1)
        shape = codes.shape[:-1] + (codes.shape[-1] * 2,)
        x = jnp.asarray(NF4_VALUES)[idx.reshape(-1, block).astype(jnp.int32)]
    return (x * scale.astype(jnp.float32)[:, None]).reshape(shape).astype(scale.dtype)


def quantize_flat(flat: dict, kind: str, block: int) -> dict:
    """A flat frozen tree with its quantizable leaves replaced by codes and scales."""
    out = {}
    for path, leaf in flat.items():
        if quantizable(path, leaf.shape, block):
            out[path + (CODES,)], out[path + (SCALE,)] = quantize(leaf, kind, block)
        else:
            out[path] = leaf
    return out


def dequantize_flat(flat: dict, kind: str, block: int) -> dict:
    """Inverse of quantize_flat (up to the rounding): the base leaves back in their dtype."""
    if not any(p and p[-1] == CODES for p in flat):
        return flat
    out = {}
    for path, leaf in flat.items():
        if path[-1] == CODES:
            out[path[:-1]] = dequantize(leaf, flat[path[:-1] + (SCALE,)], kind, block)
        elif path[-1] != SCALE:
            out[path] = leaf
    return out


def axes(path: tuple, shape: tuple, names: dict):
    """Logical names of codes (the base leaf's) and scales (its first dim's name)."""
    if not path or path[-1] not in (CODES, SCALE):
        return None
    base = names.get(path[:-1])
    if base is None:
        return None
    return tuple(base) if path[-1] == CODES else (base[0],)


def max_error_bound(kind: str) -> float:
    """Largest |W - deq(q(W))| / absmax of its block."""
    if kind == "int8":
        return 0.5 / 127.0
    return float(np.max(np.diff(NF4_VALUES)) / 2)
