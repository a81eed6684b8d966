"""What every layer of a stack sees besides the residual stream.

The Transformer builds one Context per stack (masks, relative bias, positions, the encoder
output for cross-attention); nn.scan broadcasts it to every Block, and each Attention reads
what it needs from it instead of taking the pieces as arguments. Under context parallelism
(mesh.context > 1) the stack's tokens may be reordered for load balancing: every per-token
array here is then in that order, and `index` says where each token came from.
"""
from __future__ import annotations

from typing import Optional

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class Context:
    positions: Array  # [b, t] position of each query token (RoPE, relative bias)
    segments: Optional[Array] = None  # [b, t] packed-document ids, 0 = padding
    mask: Optional[Array] = None  # [b, 1, t, s] self-attention mask; None: the KV cache masks
    bias: Optional[Array] = None  # [b, heads, t, s] relative position bias (T5)
    prefix: Optional[Array] = None  # [b, t] prefix-LM bidirectional prefix (already in mask)
    encoded: Optional[Array] = None  # [b, s_enc, d] encoder output, for cross-attention
    cross_mask: Optional[Array] = None  # [b, 1, t, s_enc] which encoder tokens a query sees
    encoded_positions: Optional[Array] = None  # [b, s_enc]
    # [t] original position of each token in the current order (load balancing); None: natural
    index: Optional[Array] = None
    # The sequence is split over the `context` mesh axis: self-attention runs the
    # context-parallel op (segments, causal by `index`, `prefix`); `mask` is None.
    context_parallel: bool = struct.field(pytree_node=False, default=False)
