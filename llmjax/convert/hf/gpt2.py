"""GPT-2: Conv1D weights ([in, out]) and a fused `c_attn` that splits into query/key/value."""
from __future__ import annotations

import numpy as np

from llmjax.config import ModelConfig
from llmjax.convert.hf.family import Family, register
from llmjax.convert.hf.specs import (GELU_EXPORT, GELU_NAMES, Spec, activation_of, conv1d_specs,
                                     fix_norm_shapes, hf_get, norm_specs, require_plain_mha,
                                     same_spec, unsupported, untied_head)


@register
class GPT2(Family):
    name = "gpt2"
    llmjax_family = "gpt"
    model_types = ("gpt2",)
    architectures = ("GPT2LMHeadModel", "GPT2Model")
    prefix = "transformer."

    def to_config(self, hf, tensors):
        for field, default, ok, why in [
                ("scale_attn_by_inverse_layer_idx", False, lambda v: not v,
                 "llmjax scales attention by 1/sqrt(d_k) only"),
                ("scale_attn_weights", True, bool, "llmjax always scales attention"),
                ("add_cross_attention", False, lambda v: not v, "no cross-attention in GPT-2")]:
            unsupported(hf, field, ok, default, "gpt2", why)
        d = hf.get("n_embd", 768)
        untied = hf.get("tie_word_embeddings", True) is False
        return ModelConfig(
            family="gpt", architecture="decoder", vocab_size=hf.get("vocab_size", 50257),
            d_model=d, num_layers=hf.get("n_layer", 12), num_heads=hf.get("n_head", 12),
            d_ff=hf_get(hf, "n_inner", 4 * d), max_len=hf.get("n_positions", 1024),
            norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_position="pre",
            activation=activation_of(hf.get("activation_function", "gelu_new"), GELU_NAMES,
                                     "activation_function", "gpt2"),
            position="learned", use_bias=True, tie_embeddings=not untied, scan_layers=False,
            # GPT-2 drops embeddings (embd_pdrop) and residual branches (resid_pdrop) alike here.
            dropout=hf_get(hf, "resid_pdrop", 0.1), attention_dropout=hf_get(hf, "attn_pdrop", 0.1))

    def specs(self, cfg, prefix):
        d, heads, hd, ff = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
        p = prefix
        specs = [same_spec("embed/token/embedding", p + "wte.weight", (cfg.vocab_size, d)),
                 same_spec("embed/position/embedding", p + "wpe.weight", (cfg.max_len, d))]
        for i in range(cfg.num_layers):
            L, h = f"decoder/layers_{i}", f"{p}h.{i}"
            attn = f"{L}/attention"
            qkv = tuple(f"{attn}/{n}/kernel" for n in ("query", "key", "value"))
            qkv_b = tuple(f"{attn}/{n}/bias" for n in ("query", "key", "value"))
            specs += norm_specs(f"{L}/attention_norm", f"{h}.ln_1", True)
            specs.append(Spec(qkv, (f"{h}.attn.c_attn.weight",), (d, 3 * heads * hd),
                              lambda w: tuple(x.reshape(d, heads, hd)
                                              for x in np.split(w, 3, axis=1)),
                              lambda xs: np.concatenate([x.reshape(d, -1) for x in xs], 1)))
            specs.append(Spec(qkv_b, (f"{h}.attn.c_attn.bias",), (3 * heads * hd,),
                              lambda b: tuple(x.reshape(heads, hd) for x in np.split(b, 3)),
                              lambda xs: np.concatenate([x.reshape(-1) for x in xs])))
            specs += conv1d_specs(f"{attn}/out", f"{h}.attn.c_proj", (heads, hd), (d,))
            specs += norm_specs(f"{L}/mlp_norm", f"{h}.ln_2", True)
            specs += conv1d_specs(f"{L}/mlp/wi", f"{h}.mlp.c_fc", (d,), (ff,))
            specs += conv1d_specs(f"{L}/mlp/wo", f"{h}.mlp.c_proj", (ff,), (d,))
        specs += norm_specs("decoder/final_norm", p + "ln_f", True)
        specs += untied_head(cfg, d)
        return fix_norm_shapes(specs, d)

    export_name = "GPT-2"
    export_requires = {  # fields that must hold to export as GPT-2
        "architecture": "decoder", "norm": "layernorm", "norm_position": "pre",
        "position": "learned", "use_bias": True, "gated_mlp": False, "parallel_block": False,
        "scale_attention": True, "embed_norm": False, "final_norm": True, "num_token_types": 0,
        "logits_scale": 1.0, "num_labels": 0, "activation": tuple(GELU_EXPORT),
    }

    def check_export(self, cfg):
        super().check_export(cfg)
        require_plain_mha(cfg, "GPT-2")

    def hf_config(self, cfg):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
                "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
                "activation_function": GELU_EXPORT[cfg.activation],
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": cfg.attention_dropout}
