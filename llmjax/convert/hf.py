"""Hugging Face safetensors directories <-> llmjax parameter trees, torch-free.

One table per family (GPT-2, BERT, T5, LLaMA) lists, for every HF tensor,
the llmjax path(s) it becomes and the two reshapes between them. The same
table drives import and export, so the two directions cannot drift apart.
HF `nn.Linear` weights are [out, in]; llmjax kernels are [in..., out...] with
heads kept as their own dimension. GPT-2's Conv1D weights are already [in, out]
and its fused `c_attn` splits into query/key/value. HF LLaMA already stores
Q/K rows in the half-split (rotate_half) RoPE layout llmjax uses.
"""
from __future__ import annotations

import abc

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import ml_dtypes
import numpy as np

from llmjax.config import ConfigError, ModelConfig
from llmjax.errors import ConversionError
from llmjax.convert.safetensors_io import parse_size, read_hf_tensors, write_hf_tensors
from llmjax.data.tokenizer import read_json_object
from llmjax.tree import flatten, stack_layers, unflatten, unstack_layers

Params = dict
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "spiece.model", "tokenizer.model", "merges.txt", "vocab.json",
                   "generation_config.json", "added_tokens.json", "chat_template.jinja")
# An llmjax-trained sentencepiece tokenizer (llmjax/data/tokenizer.py) in an llmjax export.
LLMJAX_TOKENIZER_FILES = ("llmjax_tokenizer.json", "spm.model")


class Spec(NamedTuple):
    """One HF tensor <-> one or more llmjax leaves."""

    paths: tuple[str, ...]  # llmjax paths (unscanned: .../layers_i/...)
    hf: tuple[str, ...]  # HF name, then accepted aliases
    hf_shape: tuple[int, ...]
    to_llmjax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]


def _same(path: str, hf: str | tuple, shape: tuple) -> Spec:
    names = (hf,) if isinstance(hf, str) else tuple(hf)
    return Spec((path,), names, tuple(shape), lambda w: (w,), lambda xs: xs[0])


def _linear(path: str, hf: str, in_shape: tuple, out_shape: tuple, bias: bool) -> list[Spec]:
    """An HF nn.Linear (weight [out, in]) as an llmjax Dense (kernel [in..., out...])."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    specs = [Spec((f"{path}/kernel",), (f"{hf}.weight",), (n_out, n_in),
                  lambda w: (w.T.reshape(in_shape + out_shape),),
                  lambda xs: xs[0].reshape(n_in, n_out).T)]
    if bias:
        specs.append(Spec((f"{path}/bias",), (f"{hf}.bias",), (n_out,),
                          lambda b: (b.reshape(out_shape),), lambda xs: xs[0].reshape(-1)))
    return specs


def _conv1d(path: str, hf: str, in_shape: tuple, out_shape: tuple) -> list[Spec]:
    """A GPT-2 Conv1D (weight [in, out], bias [out])."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return [Spec((f"{path}/kernel",), (f"{hf}.weight",), (n_in, n_out),
                 lambda w: (w.reshape(in_shape + out_shape),),
                 lambda xs: xs[0].reshape(n_in, n_out)),
            Spec((f"{path}/bias",), (f"{hf}.bias",), (n_out,),
                 lambda b: (b.reshape(out_shape),), lambda xs: xs[0].reshape(-1))]


def _norm(path: str, hf: str, bias: bool, weight_name: str = "weight") -> list[Spec]:
    specs = [Spec((f"{path}/scale",), (f"{hf}.{weight_name}",), (), lambda w: (w,),
                  lambda xs: xs[0])]
    if bias:
        specs.append(Spec((f"{path}/bias",), (f"{hf}.bias",), (), lambda w: (w,),
                          lambda xs: xs[0]))
    return specs


def _fix_norm_shapes(specs: list[Spec], d: int) -> list[Spec]:
    return [s._replace(hf_shape=(d,)) if s.hf_shape == () else s for s in specs]


def _require(cfg: ModelConfig, field: str, allowed: Any, why: str) -> None:
    value = getattr(cfg, field)
    ok = value in allowed if isinstance(allowed, (tuple, list, set)) else value == allowed
    if not ok:
        raise ConversionError(f"model.{field}={value!r} cannot be exported as {why}: "
                              f"it needs {allowed!r}")


def _require_plain_mha(cfg: ModelConfig, why: str) -> None:
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
        raise ConversionError(f"model.num_kv_heads/head_dim: {why} needs plain multi-head "
                              f"attention with num_heads * head_dim == d_model")


def _untied_head(cfg: ModelConfig, d: int) -> list:
    """lm_head/kernel [d, vocab] <-> lm_head.weight [vocab, d], when the head is not tied."""
    if cfg.tie_embeddings:
        return []
    return [Spec(("lm_head/kernel",), ("lm_head.weight",), (cfg.vocab_size, d),
                 lambda w: (w.T,), lambda xs: xs[0].T)]


def _hf_get(hf: dict, field: str, default: Any = None) -> Any:
    return hf.get(field, default) if hf.get(field) is not None else default


def _unsupported(hf: dict, field: str, ok: Callable[[Any], bool], default: Any, family: str,
                 why: str) -> None:
    value = hf.get(field, default)
    if not ok(value):
        raise ConversionError(f"config.json field {field!r}={value!r} is not supported for "
                              f"{family}: {why}")


def _activation(name: str, table: dict, field: str, family: str) -> str:
    if name not in table:
        raise ConversionError(f"config.json field {field!r}={name!r} is not supported for "
                              f"{family}; supported: {sorted(table)}")
    return table[name]


# ----------------------------------------------------------------------------
# Families


class Family(abc.ABC):
    name = ""
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    prefix = ""  # base-model prefix in task-head checkpoints (transformer., bert., model.)

    @abc.abstractmethod
    def to_config(self, hf: dict, tensors: dict) -> ModelConfig:
        """The llmjax model config of an HF config.json (and its tensors, for shapes)."""

    @abc.abstractmethod
    def specs(self, cfg: ModelConfig, prefix: str) -> list[Spec]:
        """How every llmjax leaf maps onto HF tensor names."""

    export_name = ""  # the HF family named in export errors
    export_requires: dict[str, Any] = {}  # ModelConfig field -> allowed value(s)

    def check_export(self, cfg: ModelConfig) -> None:
        for field in ("prompt_tokens", "prefix_tokens", "adapter_dim"):
            _require(cfg, field, 0, "a Hugging Face model (merge or export the PEFT "
                     "parameters separately)")
        for field, allowed in self.export_requires.items():
            _require(cfg, field, allowed, self.export_name)

    @abc.abstractmethod
    def hf_config(self, cfg: ModelConfig) -> dict:
        """config.json for an exported model."""

    def export_prefix(self, cfg: ModelConfig) -> str:
        return self.prefix

    def ignorable(self, name: str, cfg: ModelConfig) -> bool:
        """HF tensors that carry no information beyond the ones the specs read."""
        return (name.endswith(("position_ids", "rotary_emb.inv_freq", ".attn.bias",
                               ".attn.masked_bias"))
                or (name == "lm_head.weight" and cfg.tie_embeddings))  # a saved tied copy


GELU_NAMES = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
              "gelu": "gelu_exact", "relu": "relu", "silu": "silu", "swish": "silu"}
GELU_EXPORT = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}


class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    architectures = ("GPT2LMHeadModel", "GPT2Model")
    prefix = "transformer."

    def to_config(self, hf, tensors):
        for field, default, ok, why in [
                ("scale_attn_by_inverse_layer_idx", False, lambda v: not v,
                 "llmjax scales attention by 1/sqrt(d_k) only"),
                ("scale_attn_weights", True, bool, "llmjax always scales attention"),
                ("add_cross_attention", False, lambda v: not v, "no cross-attention in GPT-2")]:
            _unsupported(hf, field, ok, default, "gpt2", why)
        d = hf.get("n_embd", 768)
        untied = hf.get("tie_word_embeddings", True) is False
        return ModelConfig(
            family="gpt", architecture="decoder", vocab_size=hf.get("vocab_size", 50257),
            d_model=d, num_layers=hf.get("n_layer", 12), num_heads=hf.get("n_head", 12),
            d_ff=_hf_get(hf, "n_inner", 4 * d), max_len=hf.get("n_positions", 1024),
            norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_position="pre",
            activation=_activation(hf.get("activation_function", "gelu_new"), GELU_NAMES,
                                   "activation_function", "gpt2"),
            position="learned", use_bias=True, tie_embeddings=not untied, scan_layers=False,
            # GPT-2 drops embeddings (embd_pdrop) and residual branches (resid_pdrop) alike here.
            dropout=_hf_get(hf, "resid_pdrop", 0.1), attention_dropout=_hf_get(hf, "attn_pdrop", 0.1))

    def specs(self, cfg, prefix):
        d, heads, hd, ff = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
        p = prefix
        specs = [_same("embed/token/embedding", p + "wte.weight", (cfg.vocab_size, d)),
                 _same("embed/position/embedding", p + "wpe.weight", (cfg.max_len, d))]
        for i in range(cfg.num_layers):
            L, h = f"decoder/layers_{i}", f"{p}h.{i}"
            attn = f"{L}/attention"
            qkv = tuple(f"{attn}/{n}/kernel" for n in ("query", "key", "value"))
            qkv_b = tuple(f"{attn}/{n}/bias" for n in ("query", "key", "value"))
            specs += _norm(f"{L}/attention_norm", f"{h}.ln_1", True)
            specs.append(Spec(qkv, (f"{h}.attn.c_attn.weight",), (d, 3 * heads * hd),
                              lambda w: tuple(x.reshape(d, heads, hd)
                                              for x in np.split(w, 3, axis=1)),
                              lambda xs: np.concatenate([x.reshape(d, -1) for x in xs], 1)))
            specs.append(Spec(qkv_b, (f"{h}.attn.c_attn.bias",), (3 * heads * hd,),
                              lambda b: tuple(x.reshape(heads, hd) for x in np.split(b, 3)),
                              lambda xs: np.concatenate([x.reshape(-1) for x in xs])))
            specs += _conv1d(f"{attn}/out", f"{h}.attn.c_proj", (heads, hd), (d,))
            specs += _norm(f"{L}/mlp_norm", f"{h}.ln_2", True)
            specs += _conv1d(f"{L}/mlp/wi", f"{h}.mlp.c_fc", (d,), (ff,))
            specs += _conv1d(f"{L}/mlp/wo", f"{h}.mlp.c_proj", (ff,), (d,))
        specs += _norm("decoder/final_norm", p + "ln_f", True)
        specs += _untied_head(cfg, d)
        return _fix_norm_shapes(specs, d)

    export_name = "GPT-2"
    export_requires = {  # fields that must hold to export as GPT-2
        "architecture": "decoder", "norm": "layernorm", "norm_position": "pre",
        "position": "learned", "use_bias": True, "gated_mlp": False, "parallel_block": False,
        "scale_attention": True, "embed_norm": False, "final_norm": True, "num_token_types": 0,
        "logits_scale": 1.0, "num_labels": 0, "activation": tuple(GELU_EXPORT),
    }

    def check_export(self, cfg):
        super().check_export(cfg)
        _require_plain_mha(cfg, "GPT-2")

    def hf_config(self, cfg):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
                "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
                "activation_function": GELU_EXPORT[cfg.activation],
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": cfg.attention_dropout}


class Bert(Family):
    name = "bert"
    model_types = ("bert",)
    architectures = ("BertForPreTraining", "BertModel", "BertForMaskedLM",
                     "BertForSequenceClassification")
    prefix = "bert."

    def to_config(self, hf, tensors):
        for field, default, ok, why in [
                ("position_embedding_type", "absolute", lambda v: v == "absolute",
                 "only absolute (learned) positions"),
                ("is_decoder", False, lambda v: not v, "BERT is imported as an encoder"),
                ("add_cross_attention", False, lambda v: not v, "no cross-attention")]:
            _unsupported(hf, field, ok, default, "bert", why)
        prefix = self.prefix if any(k.startswith(self.prefix) for k in tensors) else ""
        activation = _activation(hf.get("hidden_act", "gelu"), GELU_NAMES, "hidden_act", "bert")
        mlm = "cls.predictions.transform.dense.weight" in tensors
        if mlm and activation != "gelu_exact":
            raise ConversionError(f"config.json field 'hidden_act'={hf.get('hidden_act')!r} is "
                                  "not supported for bert with an MLM head (llmjax's MLM "
                                  "transform uses exact GELU)")
        classifier = tensors.get("classifier.weight")
        return ModelConfig(
            family="bert", architecture="encoder", vocab_size=hf.get("vocab_size", 30522),
            d_model=hf.get("hidden_size", 768), num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            d_ff=hf.get("intermediate_size", 3072),
            max_len=hf.get("max_position_embeddings", 512), norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post", embed_norm=True,
            final_norm=False, activation=activation, position="learned", use_bias=True,
            tie_embeddings=True, num_token_types=hf.get("type_vocab_size", 2),
            pooler=f"{prefix}pooler.dense.weight" in tensors, mlm_head=mlm,
            nsp_head="cls.seq_relationship.weight" in tensors,
            num_labels=0 if classifier is None else int(classifier.shape[0]), scan_layers=False,
            dropout=_hf_get(hf, "hidden_dropout_prob", 0.1),
            attention_dropout=_hf_get(hf, "attention_probs_dropout_prob", 0.1))

    def specs(self, cfg, prefix):
        d, heads, hd, ff = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
        p = prefix
        specs = [_same("embed/token/embedding", p + "embeddings.word_embeddings.weight",
                       (cfg.vocab_size, d)),
                 _same("embed/position/embedding", p + "embeddings.position_embeddings.weight",
                       (cfg.max_len, d))]
        if cfg.num_token_types:
            specs.append(_same("embed/token_type/embedding",
                               p + "embeddings.token_type_embeddings.weight",
                               (cfg.num_token_types, d)))
        specs += _norm("embed/norm", p + "embeddings.LayerNorm", True)
        for i in range(cfg.num_layers):
            L, h = f"encoder/layers_{i}", f"{p}encoder.layer.{i}"
            for name in ("query", "key", "value"):
                specs += _linear(f"{L}/attention/{name}", f"{h}.attention.self.{name}", (d,),
                                 (heads, hd), True)
            specs += _linear(f"{L}/attention/out", f"{h}.attention.output.dense", (heads, hd),
                             (d,), True)
            specs += _norm(f"{L}/attention_norm", f"{h}.attention.output.LayerNorm", True)
            specs += _linear(f"{L}/mlp/wi", f"{h}.intermediate.dense", (d,), (ff,), True)
            specs += _linear(f"{L}/mlp/wo", f"{h}.output.dense", (ff,), (d,), True)
            specs += _norm(f"{L}/mlp_norm", f"{h}.output.LayerNorm", True)
        if cfg.pooler:
            specs += _linear("heads/pooler", p + "pooler.dense", (d,), (d,), True)
        if cfg.mlm_head:
            specs += _linear("heads/mlm_transform", "cls.predictions.transform.dense", (d,), (d,),
                             True)
            specs += _norm("heads/mlm_norm", "cls.predictions.transform.LayerNorm", True)
            specs.append(_same("heads/mlm_bias", ("cls.predictions.bias",
                                                  "cls.predictions.decoder.bias"),
                               (cfg.vocab_size,)))
        if cfg.nsp_head:
            specs += _linear("heads/nsp", "cls.seq_relationship", (d,), (2,), True)
        if cfg.num_labels:
            specs += _linear("heads/classifier", "classifier", (d,), (cfg.num_labels,), True)
        return _fix_norm_shapes(specs, d)

    export_name = "BERT"
    export_requires = {  # fields that must hold to export as BERT
        "architecture": "encoder", "norm": "layernorm", "norm_position": "post",
        "position": "learned", "use_bias": True, "gated_mlp": False, "parallel_block": False,
        "scale_attention": True, "embed_norm": True, "final_norm": False,
        "tie_embeddings": True, "activation": tuple(GELU_EXPORT),
    }

    def check_export(self, cfg):
        super().check_export(cfg)
        _require_plain_mha(cfg, "BERT")
        if cfg.num_labels and (cfg.mlm_head or cfg.nsp_head):
            raise ConversionError("model.num_labels with model.mlm_head/nsp_head: no HF BERT "
                                  "class holds both; export one or the other")

    def architecture(self, cfg):
        if cfg.num_labels:
            return "BertForSequenceClassification"
        if cfg.mlm_head and cfg.nsp_head:
            return "BertForPreTraining"
        if cfg.mlm_head:
            return "BertForMaskedLM"
        if cfg.nsp_head:
            raise ConversionError("model.nsp_head without model.mlm_head has no HF BERT class")
        return "BertModel"

    def export_prefix(self, cfg):
        return "" if self.architecture(cfg) == "BertModel" else self.prefix

    def hf_config(self, cfg):
        out = {"architectures": [self.architecture(cfg)], "model_type": "bert",
               "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
               "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
               "intermediate_size": cfg.d_ff, "hidden_act": GELU_EXPORT[cfg.activation],
               "max_position_embeddings": cfg.max_len,
               "type_vocab_size": max(cfg.num_token_types, 1), "layer_norm_eps": cfg.norm_eps,
               "hidden_dropout_prob": cfg.dropout,
               "attention_probs_dropout_prob": cfg.attention_dropout,
               "position_embedding_type": "absolute", "tie_word_embeddings": True}
        if cfg.num_labels:
            out["num_labels"] = cfg.num_labels
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        return out

    def ignorable(self, name, cfg):
        return super().ignorable(name, cfg) or name == "cls.predictions.decoder.weight"


T5_FF = {"gated-gelu": ("gelu", True), "gated-gelu_new": ("gelu", True),
         "gated-silu": ("silu", True), "gated-relu": ("relu", True), "relu": ("relu", False),
         "gelu": ("gelu_exact", False), "gelu_new": ("gelu", False), "silu": ("silu", False)}


class T5(Family):
    name = "t5"
    model_types = ("t5",)
    architectures = ("T5ForConditionalGeneration",)

    def to_config(self, hf, tensors):
        ff = hf.get("feed_forward_proj", "relu")
        if ff not in T5_FF:
            raise ConversionError(f"config.json field 'feed_forward_proj'={ff!r} is not "
                                  f"supported for t5; supported: {sorted(T5_FF)}")
        activation, gated = T5_FF[ff]
        d = hf.get("d_model", 512)
        # Original T5 scales the decoder output by d_model**-0.5 before the (tied) head;
        # transformers>=5 records it as scale_decoder_outputs, older configs as tie_word_embeddings.
        scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
        shared = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
        head = tensors.get("lm_head.weight")
        tied = head is None or (shared is not None and head.shape == shared.shape
                                and np.array_equal(head, shared))
        layers = hf.get("num_layers", 6)
        return ModelConfig(
            family="t5", architecture="encoder_decoder", vocab_size=hf.get("vocab_size", 32128),
            d_model=d, num_layers=layers,
            num_decoder_layers=_hf_get(hf, "num_decoder_layers", layers),
            num_heads=hf.get("num_heads", 8), head_dim=hf.get("d_kv", 64),
            d_ff=hf.get("d_ff", 2048), max_len=hf.get("n_positions", 512), norm="rmsnorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=activation, gated_mlp=gated,
            position="relative",
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128),
            scale_attention=False, use_bias=False, tie_embeddings=tied,
            logits_scale=d ** -0.5 if scale else 1.0, scan_layers=False,
            dropout=_hf_get(hf, "dropout_rate", 0.1), attention_dropout=_hf_get(hf, "dropout_rate", 0.1))

    def specs(self, cfg, prefix):
        d, heads, hd, ff = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
        specs = [_same("embed/token/embedding", ("shared.weight", "encoder.embed_tokens.weight"),
                       (cfg.vocab_size, d))]
        bias_shape = (cfg.relative_buckets, heads)
        specs.append(_same("encoder_bias/embedding",
                           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           bias_shape))
        specs.append(_same("decoder_bias/embedding",
                           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           bias_shape))

        def attention(path, hf):
            out = []
            for name, letter in (("query", "q"), ("key", "k"), ("value", "v")):
                out += _linear(f"{path}/{name}", f"{hf}.{letter}", (d,), (heads, hd), False)
            return out + _linear(f"{path}/out", f"{hf}.o", (heads, hd), (d,), False)

        def mlp(path, hf):
            if cfg.gated_mlp:
                out = _linear(f"{path}/wi_0", f"{hf}.wi_0", (d,), (ff,), False)
                out += _linear(f"{path}/wi_1", f"{hf}.wi_1", (d,), (ff,), False)
            else:
                out = _linear(f"{path}/wi", f"{hf}.wi", (d,), (ff,), False)
            return out + _linear(f"{path}/wo", f"{hf}.wo", (ff,), (d,), False)

        for i in range(cfg.num_layers):
            L, h = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
            specs += attention(f"{L}/attention", f"{h}.0.SelfAttention")
            specs += _norm(f"{L}/attention_norm", f"{h}.0.layer_norm", False)
            specs += mlp(f"{L}/mlp", f"{h}.1.DenseReluDense")
            specs += _norm(f"{L}/mlp_norm", f"{h}.1.layer_norm", False)
        specs += _norm("encoder/final_norm", "encoder.final_layer_norm", False)
        for i in range(cfg.decoder_layers):
            L, h = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
            specs += attention(f"{L}/attention", f"{h}.0.SelfAttention")
            specs += _norm(f"{L}/attention_norm", f"{h}.0.layer_norm", False)
            specs += attention(f"{L}/cross_attention", f"{h}.1.EncDecAttention")
            specs += _norm(f"{L}/cross_attention_norm", f"{h}.1.layer_norm", False)
            specs += mlp(f"{L}/mlp", f"{h}.2.DenseReluDense")
            specs += _norm(f"{L}/mlp_norm", f"{h}.2.layer_norm", False)
        specs += _norm("decoder/final_norm", "decoder.final_layer_norm", False)
        specs += _untied_head(cfg, d)
        return _fix_norm_shapes(specs, d)

    export_name = "T5"
    export_requires = {  # fields that must hold to export as T5
        "architecture": "encoder_decoder", "norm": "rmsnorm", "norm_position": "pre",
        "position": "relative", "use_bias": False, "parallel_block": False,
        "scale_attention": False, "embed_norm": False, "final_norm": True, "num_token_types": 0,
    }

    def check_export(self, cfg):
        super().check_export(cfg)
        scale = cfg.d_model ** -0.5
        if not (cfg.logits_scale == 1.0 or math.isclose(cfg.logits_scale, scale, rel_tol=1e-6)):
            raise ConversionError(f"model.logits_scale={cfg.logits_scale} cannot be exported as "
                                  f"T5: it needs 1.0 or d_model**-0.5={scale}")
        if (cfg.activation, cfg.gated_mlp) not in T5_FF.values():
            raise ConversionError(f"model.activation={cfg.activation!r} (gated_mlp="
                                  f"{cfg.gated_mlp}) has no T5 feed_forward_proj")

    def hf_config(self, cfg):
        ff = {v: k for k, v in reversed(list(T5_FF.items()))}[(cfg.activation, cfg.gated_mlp)]
        scaled = cfg.logits_scale != 1.0
        return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
                "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.dim_per_head,
                "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
                "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.num_heads,
                "relative_attention_num_buckets": cfg.relative_buckets,
                "relative_attention_max_distance": cfg.relative_max_distance,
                "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": ff,
                "dropout_rate": cfg.dropout, "n_positions": cfg.max_len, "is_encoder_decoder": True,
                "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
                # Both readings of this flag (tying, decoder-output scaling) agree with
                # the lm_head.weight written beside it.
                "tie_word_embeddings": scaled, "scale_decoder_outputs": scaled}

    def export_tensors(self, cfg, tensors):
        """Always write lm_head.weight: transformers>=5 then loads tied and untied alike."""
        if "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = tensors["shared.weight"]
        return tensors

    def ignorable(self, name, cfg):
        return (super().ignorable(name, cfg)
                or name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
                or (name == "lm_head.weight" and cfg.tie_embeddings))


class Llama(Family):
    name = "llama"
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)
    prefix = "model."

    def to_config(self, hf, tensors):
        for field, default, ok, why in [
                ("attention_bias", False, lambda v: not v, "llmjax LLaMA has no attention biases"),
                ("mlp_bias", False, lambda v: not v, "llmjax LLaMA has no MLP biases"),
                ("hidden_act", "silu", lambda v: v == "silu", "LLaMA's MLP is SwiGLU"),
                ("rope_scaling", None,
                 lambda v: not v or (v.get("rope_type", v.get("type")) == "default"),
                 "only plain RoPE (no scaling) is implemented")]:
            _unsupported(hf, field, ok, default, "llama", why)
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConversionError(f"config.json field 'rope_parameters.rope_type'="
                                  f"{rope.get('rope_type')!r} is not supported for llama: only "
                                  f"plain RoPE (no scaling) is implemented")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        d, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
        tied = hf.get("tie_word_embeddings", False) is not False
        if not tied and "lm_head.weight" not in tensors and any(
                k.startswith(self.prefix) for k in tensors):
            pass  # reported as a missing tensor (lm_head.weight) with the others
        return ModelConfig(
            family="llama", architecture="decoder", vocab_size=hf.get("vocab_size", 32000),
            d_model=d, num_layers=hf.get("num_hidden_layers", 32), num_heads=heads,
            num_kv_heads=_hf_get(hf, "num_key_value_heads", heads),
            head_dim=_hf_get(hf, "head_dim", d // heads),
            d_ff=hf.get("intermediate_size", 11008),
            max_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6), activation="silu", gated_mlp=True,
            position="rope", rope_theta=float(theta), use_bias=False, tie_embeddings=tied,
            scan_layers=False, attention_dropout=_hf_get(hf, "attention_dropout", 0.0))

    def specs(self, cfg, prefix):
        d, heads, kv, hd, ff = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head,
                                cfg.d_ff)
        p = prefix
        specs = [_same("embed/token/embedding", p + "embed_tokens.weight", (cfg.vocab_size, d))]
        for i in range(cfg.num_layers):
            L, h = f"decoder/layers_{i}", f"{p}layers.{i}"
            specs += _norm(f"{L}/attention_norm", f"{h}.input_layernorm", False)
            specs += _linear(f"{L}/attention/query", f"{h}.self_attn.q_proj", (d,), (heads, hd),
                             False)
            specs += _linear(f"{L}/attention/key", f"{h}.self_attn.k_proj", (d,), (kv, hd), False)
            specs += _linear(f"{L}/attention/value", f"{h}.self_attn.v_proj", (d,), (kv, hd),
                             False)
            specs += _linear(f"{L}/attention/out", f"{h}.self_attn.o_proj", (heads, hd), (d,),
                             False)
            specs += _norm(f"{L}/mlp_norm", f"{h}.post_attention_layernorm", False)
            specs += _linear(f"{L}/mlp/wi_0", f"{h}.mlp.gate_proj", (d,), (ff,), False)
            specs += _linear(f"{L}/mlp/wi_1", f"{h}.mlp.up_proj", (d,), (ff,), False)
            specs += _linear(f"{L}/mlp/wo", f"{h}.mlp.down_proj", (ff,), (d,), False)
        specs += _norm("decoder/final_norm", p + "norm", False)
        specs += _untied_head(cfg, d)
        return _fix_norm_shapes(specs, d)

    export_name = "LLaMA"
    export_requires = {  # fields that must hold to export as LLaMA
        "architecture": "decoder", "norm": "rmsnorm", "norm_position": "pre",
        "position": "rope", "use_bias": False, "gated_mlp": True, "activation": "silu",
        "parallel_block": False, "scale_attention": True, "embed_norm": False,
        "final_norm": True, "num_token_types": 0, "logits_scale": 1.0, "num_labels": 0,
    }


    def hf_config(self, cfg):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
                "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
                "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
                "head_dim": cfg.dim_per_head, "hidden_act": "silu",
                "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": False, "mlp_bias": False,
                "attention_dropout": cfg.attention_dropout,
                "tie_word_embeddings": cfg.tie_embeddings}


FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2(), Bert(), T5(), Llama())}
LLMJAX_FAMILY = {"gpt": "gpt2", "bert": "bert", "t5": "t5", "llama": "llama"}


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES.values() for a in f.architectures]


def family_of_hf_config(hf: dict) -> Family:
    """The family of an HF config.json, from `architectures` (or `model_type`)."""
    archs = hf.get("architectures") or []
    for arch in archs:
        for family in FAMILIES.values():
            if arch in family.architectures:
                return family
    if archs:
        raise ConversionError(f"unknown architecture {archs[0]!r} in config.json; supported: "
                              f"{supported_architectures()}")
    model_type = hf.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ConversionError(f"unknown model_type {model_type!r} in config.json (and no "
                          f"'architectures'); supported: {supported_architectures()}")


def family_of_config(cfg: ModelConfig) -> Family:
    if cfg.family not in LLMJAX_FAMILY:
        raise ConversionError(f"model.family={cfg.family!r} has no Hugging Face export; "
                              f"supported: {sorted(LLMJAX_FAMILY)}")
    return FAMILIES[LLMJAX_FAMILY[cfg.family]]


# ----------------------------------------------------------------------------
# Trees ({'a/b/c': leaf} <-> nested dicts, layer (un)stacking: llmjax/tree.py)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Flat path -> shape of the llmjax parameters of `cfg` (unscanned), without allocating."""
    from llmjax.models import abstract_params

    cfg = dataclasses.replace(cfg, scan_layers=False)
    return {k: tuple(v.shape) for k, v in flatten(abstract_params(cfg, boxed=False)).items()}


def tensors_to_params(family: Family, cfg: ModelConfig, tensors: dict[str, np.ndarray],
                      source: str = "checkpoint") -> Params:
    """Map HF-named tensors onto the llmjax tree of `cfg`; errors name the tensor at fault."""
    prefix = family.prefix if any(k.startswith(family.prefix) for k in tensors) else ""
    if isinstance(family, Bert) and f"{family.prefix}embeddings.word_embeddings.weight" not in tensors:
        prefix = ""
    flat, used, missing = {}, set(), []
    for spec in family.specs(cfg, prefix):
        name = next((n for n in spec.hf if n in tensors), None)
        if name is None:
            missing.append(spec.hf[0])
            continue
        array = tensors[name]
        if tuple(array.shape) != spec.hf_shape:
            raise ConversionError(f"tensor {name!r} in {source} has shape {tuple(array.shape)}, "
                                  f"but the config implies {spec.hf_shape}")
        used.add(name)
        for path, value in zip(spec.paths, spec.to_llmjax(np.asarray(array, np.float32))):
            flat[path] = np.ascontiguousarray(value)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"missing tensor(s) in {source}: {missing[:5]}{more}")
    unused = [n for n in tensors if n not in used and not family.ignorable(n, cfg)]
    if unused:
        more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
        raise ConversionError(f"unexpected tensor(s) in {source} that the config does not "
                              f"account for: {sorted(unused)[:5]}{more}")
    shapes = expected_shapes(cfg)
    for path, shape in shapes.items():
        if path not in flat:
            raise ConversionError(f"llmjax parameter {path!r} has no source tensor")
        if tuple(flat[path].shape) != shape:
            raise ConversionError(f"llmjax parameter {path!r}: converted shape "
                                  f"{flat[path].shape} != expected {shape}")
    return unflatten(flat)


def finish(cfg: ModelConfig, params: Params, scan_layers: bool) -> tuple[ModelConfig, Params]:
    """Validate, device-put and (optionally) stack layers for nn.scan."""
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConversionError(f"converted config is invalid: {err}") from None
    params = jax.tree.map(lambda x: jax.numpy.asarray(x), params)
    if scan_layers:
        params = stack_layers(params)
    return dataclasses.replace(cfg, scan_layers=scan_layers), params


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model directory)")
    return read_json_object(path)


def import_hf(directory: str | os.PathLike, scan_layers: bool = True,
              **overrides: Any) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) of an HF safetensors model directory; torch is not needed.

    `overrides` set ModelConfig fields that HF configs do not carry (dtype, max_len, ...).
    """
    hf = read_hf_config(directory)
    family = family_of_hf_config(hf)
    tensors = read_hf_tensors(directory)
    try:
        cfg = family.to_config(hf, tensors)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as err:
        if isinstance(err, ConfigError):
            raise
        # config.json is untrusted: a wrong type or zero in a field is the file's fault
        raise ConversionError(f"{directory}/config.json: a field has an unusable value "
                              f"({type(err).__name__}: {err})") from None
    params = tensors_to_params(family, cfg, tensors, source=str(directory))
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return finish(cfg, params, scan_layers)


def params_to_tensors(cfg: ModelConfig, params: Params,
                      dtype: Any = np.float32) -> tuple[Family, dict[str, np.ndarray]]:
    """HF-named tensors (in `dtype`) of an llmjax tree (scanned or not)."""
    family = family_of_config(cfg)
    family.check_export(cfg)
    ucfg = dataclasses.replace(cfg, scan_layers=False)
    flat = flatten(unstack_layers(jax.tree.map(np.asarray, dict(params))))
    shapes = expected_shapes(ucfg)
    for path, shape in shapes.items():
        if path not in flat:
            raise ConversionError(f"llmjax parameter {path!r} is missing from the tree")
        if tuple(flat[path].shape) != shape:
            raise ConversionError(f"llmjax parameter {path!r} has shape {flat[path].shape}, "
                                  f"but the config implies {shape}")
    extra = sorted(set(flat) - set(shapes))
    if extra:
        raise ConversionError(f"llmjax parameter(s) {extra[:5]} have no Hugging Face "
                              f"counterpart (merge PEFT parameters first)")
    tensors = {}
    for spec in family.specs(ucfg, family.export_prefix(ucfg)):
        arrays = tuple(np.asarray(flat[p], np.float32) for p in spec.paths)
        # cast tensor by tensor: a 7B export never holds a second full-precision copy
        tensors[spec.hf[0]] = np.ascontiguousarray(spec.to_hf(arrays)).astype(dtype, copy=False)
    if hasattr(family, "export_tensors"):
        tensors = family.export_tensors(ucfg, tensors)
    return family, tensors


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def export_hf(cfg: ModelConfig, params: Params, out: str | os.PathLike,
              tokenizer_dir: Optional[str | os.PathLike] = None, dtype: str = "float32",
              max_shard_size: int | str = "5GB", tokenizer: Any = None) -> Path:
    """Write config.json + safetensors weights that `transformers` loads: model.safetensors,
    or shards of at most `max_shard_size` with an index (as save_pretrained writes them),
    in `dtype` (float32, bfloat16 or float16). The tokenizer (`tokenizer`, an llmjax or
    imported tokenizer object, or the files in `tokenizer_dir`) is written so
    AutoTokenizer loads it, and its bos/eos/pad ids go into config.json and
    generation_config.json."""
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"export dtype {dtype!r}: choose one of {sorted(EXPORT_DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    family, tensors = params_to_tensors(cfg, params, EXPORT_DTYPES[dtype])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = family.hf_config(cfg)
    hf["dtype"] = hf["torch_dtype"] = dtype  # the key transformers reads, and its older name
    write_hf_tensors(out, tensors, max_bytes)
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, out)
    elif tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    ids = special_token_ids(tokenizer, out)
    hf.update(ids)
    if cfg.architecture == "encoder_decoder" and "pad_token_id" in ids:
        hf["decoder_start_token_id"] = ids["pad_token_id"]  # T5 decodes from pad
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    _write_generation_config(out, hf)
    return out


def special_token_ids(tokenizer: Any, directory: Path) -> dict[str, int]:
    """bos/eos/pad ids for config.json: from the tokenizer object, else the written files."""
    special: Any = getattr(tokenizer, "special_ids", None)
    if special is None and (directory / "tokenizer.json").exists():
        from llmjax.data.tokenizer import HFTokenizer

        special = HFTokenizer(directory).special_ids
    if special is None:
        return {}
    special = dict(special)
    return {f"{role}_token_id": int(special[role]) for role in ("bos", "eos", "pad")
            if role in special}


def _write_generation_config(out: Path, hf: dict) -> None:
    path = out / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if key in hf:
            config[key] = hf[key]
    if config:
        path.write_text(json.dumps(config, indent=2) + "\n")


def _tokenizer_source(tokenizer: Any) -> tuple[Any, Optional[Path]]:
    """(the innermost tokenizer, the directory holding its files)."""
    inner = getattr(tokenizer, "inner", tokenizer)  # llmjax.data's wrapper of imported ones
    path = getattr(inner, "path", None) or getattr(inner, "model_file", None)
    return inner, (Path(path).parent if path is not None else None)


def write_hf_tokenizer(tokenizer: Any, out: str | os.PathLike) -> list[str]:
    """The tokenizer files AutoTokenizer.from_pretrained(out) loads: an imported tokenizer's
    own files, or a tokenizer.json built from an llmjax-trained sentencepiece model."""
    from llmjax.data.tokenizer import METADATA_FILE

    inner, directory = _tokenizer_source(tokenizer)
    if directory is None:
        return []
    if (directory / METADATA_FILE).exists() and not (directory / "tokenizer.json").exists():
        from llmjax.convert.sp_export import write_sentencepiece_as_hf

        return write_sentencepiece_as_hf(inner, directory / METADATA_FILE, Path(out))
    return copy_tokenizer_files(directory, out)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike,
                         names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy the tokenizer files present in `src` to `dst` (new files get the umask's
    permissions, not the source's); returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in names:
        if (src / name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
