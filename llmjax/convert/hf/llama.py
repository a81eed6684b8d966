"""LLaMA: RMSNorm, SwiGLU, RoPE, grouped-query attention. HF LLaMA already stores Q/K rows in
the half-split (rotate_half) RoPE layout llmjax uses."""
from __future__ import annotations

from llmjax.config import ModelConfig
from llmjax.convert.hf.family import Family, register
from llmjax.convert.hf.rope import hf_rope_fields, rope_fields
from llmjax.convert.hf.specs import (fix_norm_shapes, hf_get, linear_specs, norm_specs, same_spec,
                                     unsupported, untied_head)


@register
class Llama(Family):
    name = "llama"
    llmjax_family = "llama"
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)
    prefix = "model."

    def to_config(self, hf, tensors):
        for field, default, ok, why in [
                ("attention_bias", False, lambda v: not v, "llmjax LLaMA has no attention biases"),
                ("mlp_bias", False, lambda v: not v, "llmjax LLaMA has no MLP biases"),
                ("hidden_act", "silu", lambda v: v == "silu", "LLaMA's MLP is SwiGLU")]:
            unsupported(hf, field, ok, default, "llama", why)
        rope = rope_fields(hf, self.name)  # base and scaling (convert/hf/rope.py)
        d, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
        tied = hf.get("tie_word_embeddings", False) is not False
        return ModelConfig(
            family="llama", architecture="decoder", vocab_size=hf.get("vocab_size", 32000),
            d_model=d, num_layers=hf.get("num_hidden_layers", 32), num_heads=heads,
            num_kv_heads=hf_get(hf, "num_key_value_heads", heads),
            head_dim=hf_get(hf, "head_dim", d // heads),
            d_ff=hf.get("intermediate_size", 11008),
            max_len=rope.pop("max_len", hf.get("max_position_embeddings", 2048)), norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6), activation="silu", gated_mlp=True,
            position="rope", use_bias=False, tie_embeddings=tied, **rope,
            scan_layers=False, attention_dropout=hf_get(hf, "attention_dropout", 0.0))

    def specs(self, cfg, prefix):
        d, heads, kv, hd, ff = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head,
                                cfg.d_ff)
        p = prefix
        specs = [same_spec("embed/token/embedding", p + "embed_tokens.weight", (cfg.vocab_size, d))]
        for i in range(cfg.num_layers):
            L, h = f"decoder/layers_{i}", f"{p}layers.{i}"
            specs += norm_specs(f"{L}/attention_norm", f"{h}.input_layernorm", False)
            specs += linear_specs(f"{L}/attention/query", f"{h}.self_attn.q_proj", (d,),
                                  (heads, hd), False)
            specs += linear_specs(f"{L}/attention/key", f"{h}.self_attn.k_proj", (d,),
                                  (kv, hd), False)
            specs += linear_specs(f"{L}/attention/value", f"{h}.self_attn.v_proj", (d,),
                                  (kv, hd), False)
            specs += linear_specs(f"{L}/attention/out", f"{h}.self_attn.o_proj", (heads, hd), (d,),
                                  False)
            specs += norm_specs(f"{L}/mlp_norm", f"{h}.post_attention_layernorm", False)
            specs += linear_specs(f"{L}/mlp/wi_0", f"{h}.mlp.gate_proj", (d,), (ff,), False)
            specs += linear_specs(f"{L}/mlp/wi_1", f"{h}.mlp.up_proj", (d,), (ff,), False)
            specs += linear_specs(f"{L}/mlp/wo", f"{h}.mlp.down_proj", (ff,), (d,), False)
        specs += norm_specs("decoder/final_norm", p + "norm", False)
        specs += untied_head(cfg, d)
        return fix_norm_shapes(specs, d)

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
                "attention_bias": False, "mlp_bias": False,
                "attention_dropout": cfg.attention_dropout,
                "tie_word_embeddings": cfg.tie_embeddings, **hf_rope_fields(cfg)}
