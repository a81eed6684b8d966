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

Double quantization (peft.double_quantization; QLoRA section 3): the scales themselves are
quantized. Their mean is subtracted (they are all positive), then blocks of SCALE_BLOCK =
256 of them are stored as int8 codes with one float32 absmax each, so
  W/qscale   int8 (n / b,): the centred scales' codes (symmetric, round(c / absmax2 * 127));
  W/qscale2  float32 (ceil(n / b / 256),): the absmax of each block of 256 centred scales;
  W/qoffset  float32 (1,): the mean of the scales.
For nf4 with block 64 and float32 weights: 8/64 + 32/(64 * 256) = 0.127 bits per weight for
the scales instead of 32/64 = 0.5 (4.127 bits per weight in all). QLoRA stores the scales in
8-bit floats; a linear int8 code of the centred scales is simpler and as small: its error is
at most absmax2 / 254 per scale, so |W - deq| <= absmax * bound + absmax2 / 254 (a code
value is at most 1 in magnitude). A double-quantized leaf dequantizes to float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError

CODES, SCALE = "qcodes", "qscale"
SCALE2, OFFSET = "qscale2", "qoffset"  # double quantization of the scales
SCALE_BLOCK = 256  # scales per second-level block (QLoRA's)
LEAVES = (CODES, SCALE, SCALE2, OFFSET)  # the leaves a quantized weight is stored as
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


def quantize_scales(scale: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double quantization: (int8 codes [m], float32 absmax per 256 [ceil(m/256)], float32
    mean [1]) of a vector of (positive) block scales."""
    s = scale.astype(jnp.float32)
    offset = jnp.mean(s)
    m = s.shape[0]
    blocks = jnp.pad(s - offset, (0, -m % SCALE_BLOCK)).reshape(-1, SCALE_BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    safe = jnp.where(absmax > 0, absmax, 1.0)[:, None]
    codes = jnp.clip(jnp.round(blocks / safe * 127.0), -127, 127).astype(jnp.int8)
    return codes.reshape(-1)[:m], absmax, offset[None]


def dequantize_scales(codes: jax.Array, absmax: jax.Array, offset: jax.Array) -> jax.Array:
    """The float32 scales quantize_scales stored."""
    m = codes.shape[0]
    blocks = jnp.pad(codes, (0, -m % SCALE_BLOCK)).astype(jnp.float32).reshape(-1, SCALE_BLOCK)
    return (blocks / 127.0 * absmax[:, None]).reshape(-1)[:m] + offset[0]


def quantize_flat(flat: dict, kind: str, block: int, double: bool = False) -> dict:
    """A flat frozen tree with its quantizable leaves replaced by codes and scales (with
    `double`, the scales double-quantized)."""
    out = {}
    for path, leaf in flat.items():
        if quantizable(path, leaf.shape, block):
            out[path + (CODES,)], scale = quantize(leaf, kind, block)
            if double:
                out[path + (SCALE,)], out[path + (SCALE2,)], out[path + (OFFSET,)] = \
                    quantize_scales(scale)
            else:
                out[path + (SCALE,)] = scale
        else:
            out[path] = leaf
    return out


def dequantize_flat(flat: dict, kind: str, block: int) -> dict:
    """Inverse of quantize_flat (up to the rounding): the base leaves back in their dtype
    (float32 when double-quantized)."""
    if not any(p and p[-1] == CODES for p in flat):
        return flat
    out = {}
    for path, leaf in flat.items():
        if path[-1] == CODES:
            base = path[:-1]
            scale = flat[base + (SCALE,)]
            if base + (SCALE2,) in flat:
                scale = dequantize_scales(scale, flat[base + (SCALE2,)], flat[base + (OFFSET,)])
            out[base] = dequantize(leaf, scale, kind, block)
        elif path[-1] not in LEAVES:
            out[path] = leaf
    return out


def axes(path: tuple, shape: tuple, names: dict):
    """Logical names of codes (the base leaf's) and scales (its first dim's name); the
    double quantization's second-level scales and offset are small: replicated."""
    if not path or path[-1] not in LEAVES:
        return None
    if path[-1] in (SCALE2, OFFSET):
        return (None,)
    base = names.get(path[:-1])
    if base is None:
        return None
    return tuple(base) if path[-1] == CODES else (base[0],)


def max_error_bound(kind: str) -> float:
    """Largest |W - deq(q(W))| / absmax of its block."""
    if kind == "int8":
        return 0.5 / 127.0
    return float(np.max(np.diff(NF4_VALUES)) / 2)
