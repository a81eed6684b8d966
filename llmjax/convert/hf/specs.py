"""The vocabulary of a family table: one HF tensor <-> llmjax leaves (Spec), the usual
layer kinds (nn.Linear, GPT-2 Conv1D, norms, an untied head) and the checks shared by the
families' config mapping and export.

HF `nn.Linear` weights are [out, in]; llmjax kernels are [in..., out...] with heads kept as
their own dimension. GPT-2's Conv1D weights are already [in, out].
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

from llmjax.config import ModelConfig
from llmjax.errors import ConversionError


class Spec(NamedTuple):
    """One HF tensor <-> one or more llmjax leaves."""

    paths: tuple[str, ...]  # llmjax paths (unscanned: .../layers_i/...)
    hf: tuple[str, ...]  # HF name, then accepted aliases
    hf_shape: tuple[int, ...]
    to_llmjax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]


def same_spec(path: str, hf: str | tuple, shape: tuple) -> Spec:
    names = (hf,) if isinstance(hf, str) else tuple(hf)
    return Spec((path,), names, tuple(shape), lambda w: (w,), lambda xs: xs[0])


def linear_specs(path: str, hf: str, in_shape: tuple, out_shape: tuple, bias: bool) -> list[Spec]:
    """An HF nn.Linear (weight [out, in]) as an llmjax Dense (kernel [in..., out...])."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    specs = [Spec((f"{path}/kernel",), (f"{hf}.weight",), (n_out, n_in),
                  lambda w: (w.T.reshape(in_shape + out_shape),),
                  lambda xs: xs[0].reshape(n_in, n_out).T)]
    if bias:
        specs.append(Spec((f"{path}/bias",), (f"{hf}.bias",), (n_out,),
                          lambda b: (b.reshape(out_shape),), lambda xs: xs[0].reshape(-1)))
    return specs


def conv1d_specs(path: str, hf: str, in_shape: tuple, out_shape: tuple) -> list[Spec]:
    """A GPT-2 Conv1D (weight [in, out], bias [out])."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return [Spec((f"{path}/kernel",), (f"{hf}.weight",), (n_in, n_out),
                 lambda w: (w.reshape(in_shape + out_shape),),
                 lambda xs: xs[0].reshape(n_in, n_out)),
            Spec((f"{path}/bias",), (f"{hf}.bias",), (n_out,),
                 lambda b: (b.reshape(out_shape),), lambda xs: xs[0].reshape(-1))]


def norm_specs(path: str, hf: str, bias: bool, weight_name: str = "weight") -> list[Spec]:
    specs = [Spec((f"{path}/scale",), (f"{hf}.{weight_name}",), (), lambda w: (w,),
                  lambda xs: xs[0])]
    if bias:
        specs.append(Spec((f"{path}/bias",), (f"{hf}.bias",), (), lambda w: (w,),
                          lambda xs: xs[0]))
    return specs


def fix_norm_shapes(specs: list[Spec], d: int) -> list[Spec]:
    return [s._replace(hf_shape=(d,)) if s.hf_shape == () else s for s in specs]


def require(cfg: ModelConfig, field: str, allowed: Any, why: str) -> None:
    value = getattr(cfg, field)
    ok = value in allowed if isinstance(allowed, (tuple, list, set)) else value == allowed
    if not ok:
        raise ConversionError(f"model.{field}={value!r} cannot be exported as {why}: "
                              f"it needs {allowed!r}")


def require_plain_mha(cfg: ModelConfig, why: str) -> None:
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
        raise ConversionError(f"model.num_kv_heads/head_dim: {why} needs plain multi-head "
                              f"attention with num_heads * head_dim == d_model")


def untied_head(cfg: ModelConfig, d: int) -> list:
    """lm_head/kernel [d, vocab] <-> lm_head.weight [vocab, d], when the head is not tied."""
    if cfg.tie_embeddings:
        return []
    return [Spec(("lm_head/kernel",), ("lm_head.weight",), (cfg.vocab_size, d),
                 lambda w: (w.T,), lambda xs: xs[0].T)]


def hf_get(hf: dict, field: str, default: Any = None) -> Any:
    return hf.get(field, default) if hf.get(field) is not None else default


def unsupported(hf: dict, field: str, ok: Callable[[Any], bool], default: Any, family: str,
                why: str) -> None:
    value = hf.get(field, default)
    if not ok(value):
        raise ConversionError(f"config.json field {field!r}={value!r} is not supported for "
                              f"{family}: {why}")


def activation_of(name: str, table: dict, field: str, family: str) -> str:
    if name not in table:
        raise ConversionError(f"config.json field {field!r}={name!r} is not supported for "
                              f"{family}; supported: {sorted(table)}")
    return table[name]


# HF activation names <-> llmjax's (GPT-2, BERT).
GELU_NAMES = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
              "gelu": "gelu_exact", "relu": "relu", "silu": "silu", "swish": "silu"}
GELU_EXPORT = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}
