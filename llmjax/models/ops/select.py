"""The one place that picks an implementation of each op from the config.

`kernels(name)` gives the dense / tied-head / norm / activation ops for `model.kernels`
(auto | xla | cpu_custom_vjp); `attention_op(cfg, ...)` gives the attention op for
`model.attention_impl` (auto | xla | cudnn | splash), the call's situation and
`model.kernels`. Layers call what these return and know nothing of backends. With a
`context` mesh axis > 1, `sequence_split` says how the model splits (and reorders) the
sequence and `attention_op(..., context_parallel=True)` gives the context-parallel op.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig, context_parallel_unsupported
from llmjax.errors import ConfigError
from llmjax.models.ops import blockwise, cpu, cudnn, platform, reference, splash
from llmjax.models.ops import context_parallel as cp  # `context_parallel` names a flag below
from llmjax.models.ops import context_splash

KERNELS = ("auto", "xla", "cpu_custom_vjp")


class Kernels(NamedTuple):
    """One implementation of each non-attention op (reference.py's signatures)."""

    dense: Callable
    attend: Callable
    norm: Callable
    activation: Callable


XLA = Kernels(reference.dense, reference.attend, reference.norm, reference.activation)
CPU_CUSTOM_VJP = Kernels(cpu.dense, cpu.attend, cpu.norm, cpu.activation)


def resolve_kernels(name: str) -> str:
    """model.kernels for this backend: 'auto' is cpu_custom_vjp on CPU, xla elsewhere."""
    if name == "auto":
        # The mesh's devices decide (llmjax plan compiles for a TPU mesh from a CPU host).
        return "cpu_custom_vjp" if platform.platform() == "cpu" else "xla"
    return name


def kernels(name: str) -> Kernels:
    """The ops for model.kernels=`name`."""
    return CPU_CUSTOM_VJP if resolve_kernels(name) == "cpu_custom_vjp" else XLA


def resolve_attention(cfg: ModelConfig) -> str:
    """model.attention_impl for this backend; `auto` picks the safe default:
    cuDNN flash attention on GPU for bf16/fp16 (jax.nn.dot_product_attention),
    the Pallas splash kernel on TPU when the model's masks fit it, XLA's own math
    elsewhere. An explicit `splash` the model cannot use is a ConfigError."""
    impl = cfg.attention_impl
    backend = platform.platform()  # the mesh's devices: a TPU topology compiled from a CPU host
    if impl == "auto":
        if backend == "gpu" and jnp.dtype(cfg.dtype) in (jnp.bfloat16, jnp.float16):
            return "cudnn"
        if backend == "tpu" and splash.unsupported(cfg) is None:
            return "splash"
        return "xla"
    if impl == "splash":
        splash.check(cfg)  # PEFT hooks may have been set after the config was validated
    if impl == "cudnn" and backend != "gpu":
        # Checked here, not in validate(): `llmjax plan` of a GPU config runs on any host.
        raise ConfigError(f"model.attention_impl=cudnn needs a GPU (this backend: "
                          f"{backend}); use attention_impl=auto or xla")
    return impl


def context_shards() -> int:
    """Size of the `context` axis of the mesh being traced under (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get("context", 1)


class SequenceSplit(NamedTuple):
    """How a stack's sequence is laid out over the `context` axis."""

    shards: int  # devices the sequence is split over (1: not split, ordinary attention)
    order: Optional[np.ndarray] = None  # [t] load-balancing order (original positions); None: natural


def sequence_split(cfg: ModelConfig, length: int, *, causal: bool,
                   decode: bool = False) -> SequenceSplit:
    """The split of a `length`-token self-attention stack under the current mesh.

    Training lengths are checked in config validation (config.check_context_parallel); a
    length the axis does not divide (init's 8-token dummy inputs) runs ordinary attention,
    which computes the same function with the same parameters. Decoding steps (KV cache) are
    never split. Causal stacks are load balanced when model.context_load_balance is on."""
    shards = context_shards()
    if shards == 1 or decode or length % shards:
        return SequenceSplit(1)
    if causal and cfg.context_load_balance and length % (2 * shards) == 0:
        return SequenceSplit(shards, cp.load_balance_order(length, shards))
    return SequenceSplit(shards)


def attention_op(cfg: ModelConfig, *, decode: bool = False, cross: bool = False,
              prefix_lm: bool = False, dropout: bool = False,
              context_parallel: bool = False) -> Callable:
    """The attention op for one call: reference.attention's signature.

    decode: a KV-cache decoding step; cross: cross-attention; prefix_lm: the mask has a
    per-example bidirectional prefix; dropout: attention probabilities are dropped (only
    the reference exposes them); context_parallel: the sequence is split over the `context`
    mesh axis (sequence_split): the context-parallel op, which also takes `index` (the
    original position of each token) and `prefix` instead of a dense mask."""
    if context_parallel and not (decode or cross):
        if reason := context_parallel_unsupported(cfg) or (dropout and "attention dropout"):
            raise ConfigError(f"mesh.context > 1 cannot run this model: {reason}; "
                              f"use mesh.context=1")
        if (resolve_attention(cfg) == "splash" and not prefix_lm
                and cfg.context_parallel == "allgather"):  # the Mosaic kernel on TPU
            return functools.partial(context_splash.attention,
                                     load_balance=cfg.context_load_balance)
        return functools.partial(cp.attention, strategy=cfg.context_parallel)
    impl = resolve_attention(cfg)
    if impl == "splash" and (decode or cross or prefix_lm):
        if prefix_lm and cfg.attention_impl == "splash":
            raise ConfigError("model.attention_impl=splash cannot run the prefix-LM mask "
                              "(a per-example bidirectional prefix): use auto or xla")
        # KV-cache decoding steps, cross-attention (T5 only, bias elsewhere) and auto's
        # prefix-LM calls run XLA's math.
        impl = "xla"
    if dropout:
        return reference.attention
    if impl == "splash":
        return splash.attention
    if impl == "cudnn":
        return cudnn.attention
    if resolve_kernels(cfg.kernels) == "cpu_custom_vjp":
        return blockwise.attention
    return reference.attention
