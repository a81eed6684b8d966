"""T5: encoder-decoder, relative position bias, (gated) feed-forward, optional output scaling."""
from __future__ import annotations

import math

import numpy as np

from llmjax.config import ModelConfig
from llmjax.convert.hf.family import Family, register
from llmjax.convert.hf.specs import (fix_norm_shapes, hf_get, linear_specs, norm_specs, same_spec,
                                     untied_head)
from llmjax.errors import ConversionError

# HF feed_forward_proj -> (llmjax activation, gated_mlp)
T5_FF = {"gated-gelu": ("gelu", True), "gated-gelu_new": ("gelu", True),
         "gated-silu": ("silu", True), "gated-relu": ("relu", True), "relu": ("relu", False),
         "gelu": ("gelu_exact", False), "gelu_new": ("gelu", False), "silu": ("silu", False)}


@register
class T5(Family):
    name = "t5"
    llmjax_family = "t5"
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
            num_decoder_layers=hf_get(hf, "num_decoder_layers", layers),
            num_heads=hf.get("num_heads", 8), head_dim=hf.get("d_kv", 64),
            d_ff=hf.get("d_ff", 2048), max_len=hf.get("n_positions", 512), norm="rmsnorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=activation, gated_mlp=gated,
            position="relative",
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128),
            scale_attention=False, use_bias=False, tie_embeddings=tied,
            logits_scale=d ** -0.5 if scale else 1.0, scan_layers=False,
            dropout=hf_get(hf, "dropout_rate", 0.1),
            attention_dropout=hf_get(hf, "dropout_rate", 0.1))

    def specs(self, cfg, prefix):
        d, heads, hd, ff = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
        specs = [same_spec("embed/token/embedding",
                           ("shared.weight", "encoder.embed_tokens.weight"), (cfg.vocab_size, d))]
        bias_shape = (cfg.relative_buckets, heads)
        for stack in ("encoder", "decoder"):  # one table per stack, kept by its first layer
            specs.append(same_spec(
                f"{stack}_bias/embedding",
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                bias_shape))

        def attention(path, hf):
            out = []
            for name, letter in (("query", "q"), ("key", "k"), ("value", "v")):
                out += linear_specs(f"{path}/{name}", f"{hf}.{letter}", (d,), (heads, hd), False)
            return out + linear_specs(f"{path}/out", f"{hf}.o", (heads, hd), (d,), False)

        def mlp(path, hf):
            if cfg.gated_mlp:
                out = linear_specs(f"{path}/wi_0", f"{hf}.wi_0", (d,), (ff,), False)
                out += linear_specs(f"{path}/wi_1", f"{hf}.wi_1", (d,), (ff,), False)
            else:
                out = linear_specs(f"{path}/wi", f"{hf}.wi", (d,), (ff,), False)
            return out + linear_specs(f"{path}/wo", f"{hf}.wo", (ff,), (d,), False)

        for i in range(cfg.num_layers):
            L, h = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
            specs += attention(f"{L}/attention", f"{h}.0.SelfAttention")
            specs += norm_specs(f"{L}/attention_norm", f"{h}.0.layer_norm", False)
            specs += mlp(f"{L}/mlp", f"{h}.1.DenseReluDense")
            specs += norm_specs(f"{L}/mlp_norm", f"{h}.1.layer_norm", False)
        specs += norm_specs("encoder/final_norm", "encoder.final_layer_norm", False)
        for i in range(cfg.decoder_layers):
            L, h = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
            specs += attention(f"{L}/attention", f"{h}.0.SelfAttention")
            specs += norm_specs(f"{L}/attention_norm", f"{h}.0.layer_norm", False)
            specs += attention(f"{L}/cross_attention", f"{h}.1.EncDecAttention")
            specs += norm_specs(f"{L}/cross_attention_norm", f"{h}.1.layer_norm", False)
            specs += mlp(f"{L}/mlp", f"{h}.2.DenseReluDense")
            specs += norm_specs(f"{L}/mlp_norm", f"{h}.2.layer_norm", False)
        specs += norm_specs("decoder/final_norm", "decoder.final_layer_norm", False)
        specs += untied_head(cfg, d)
        return fix_norm_shapes(specs, d)

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
