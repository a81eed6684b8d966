"""cuDNN flash attention on GPU (`model.attention_impl: cudnn`, `auto` on GPU in bf16/fp16).

jax.nn.dot_product_attention(implementation="cudnn") with reference.attention's signature.
The model's dense [b, 1, t, s] mask (causal + segments + padding) goes in as the mask; the
kernel's own causal / sequence-length masks cannot express packed segments through the
public API. No attention-probability dropout (the selector sends that to the reference).
"""
from __future__ import annotations

from typing import Optional

import jax

from llmjax.models.ops import reference

Array = jax.Array


def attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
              bias: Optional[Array] = None, segments=None, causal: bool = False,
              scale: float, dropout=None) -> Array:
    """q [b, t, h, d], k/v [b, s, kh, d] -> [b, t, h, d] on cuDNN (GPU, bf16/fp16)."""
    del segments  # the dense mask states them
    if dropout is not None:
        raise ValueError("cuDNN attention does not drop attention probabilities")
    if causal and mask is None:
        mask = reference.causal_mask(q.shape[1], k.shape[1])
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        implementation="cudnn")
