"""OLMoE and Qwen3-MoE: Mixtral's table with the experts under `mlp.experts.E.gate_proj /
up_proj / down_proj` (fused `mlp.experts.gate_up_proj / down_proj` also import) and RMSNorm
on queries and keys: over all their features (OLMoE) or per head (Qwen3-MoE)."""
from __future__ import annotations

import dataclasses

from llmjax.convert.hf.family import register
from llmjax.convert.hf.mixtral import Mixtral
from llmjax.convert.hf.specs import hf_get, unsupported


class _MlpExperts(Mixtral):
    block = "mlp"
    expert_names = ("gate_proj", "up_proj", "down_proj")
    qk_norm = ""

    def _moe(self, hf, tensors, ff):
        experts = hf_get(hf, "num_experts", hf_get(hf, "num_local_experts", 8))
        base = Mixtral.to_config(self, {**hf, "num_local_experts": experts,
                                        "intermediate_size": ff}, tensors)
        return dataclasses.replace(base, family=self.llmjax_family, qk_norm=self.qk_norm,
                                   moe_renormalize=bool(hf.get("norm_topk_prob", False)))

    def hf_config(self, cfg):
        hf = Mixtral.hf_config(self, cfg)
        hf["num_experts"] = hf.pop("num_local_experts")
        hf["norm_topk_prob"] = cfg.moe_renormalize
        return hf


@register
class Olmoe(_MlpExperts):
    name = "olmoe"
    llmjax_family = "olmoe"
    model_types = ("olmoe",)
    architectures = ("OlmoeForCausalLM",)
    export_name = "OLMoE"
    qk_norm = "full"
    export_requires = {**Mixtral.export_requires, "qk_norm": "full",
                       "moe_renormalize": (True, False)}

    def to_config(self, hf, tensors):
        unsupported(hf, "clip_qkv", lambda v: v is None, None, "olmoe",
                    "clipping of queries/keys/values is not implemented")
        return self._moe(hf, tensors, hf.get("intermediate_size", 1024))

    def hf_config(self, cfg):
        hf = _MlpExperts.hf_config(self, cfg)
        hf.pop("sliding_window")
        hf.update({"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
                   "clip_qkv": None})
        return hf


@register
class Qwen3Moe(_MlpExperts):
    name = "qwen3_moe"
    llmjax_family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architectures = ("Qwen3MoeForCausalLM",)
    export_name = "Qwen3-MoE"
    qk_norm = "head"
    export_requires = {**Mixtral.export_requires, "qk_norm": "head",
                       "moe_renormalize": (True, False)}

    def to_config(self, hf, tensors):
        unsupported(hf, "decoder_sparse_step", lambda v: v in (None, 1), 1, "qwen3_moe",
                    "every layer must be an MoE layer")
        unsupported(hf, "mlp_only_layers", lambda v: not v, [], "qwen3_moe",
                    "every layer must be an MoE layer")
        unsupported(hf, "use_sliding_window", lambda v: not v, False, "qwen3_moe",
                    "sliding-window attention is not implemented")
        hf = {**hf, "sliding_window": None}
        return self._moe(hf, tensors, hf_get(hf, "moe_intermediate_size", 768))

    def hf_config(self, cfg):
        hf = _MlpExperts.hf_config(self, cfg)
        hf.update({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                   "moe_intermediate_size": cfg.expert_hidden, "decoder_sparse_step": 1,
                   "mlp_only_layers": [], "use_sliding_window": False})
        return hf


@register
class Qwen2Moe(_MlpExperts):
    """Qwen2-MoE: Qwen3-MoE's experts without q/k norms, q/k/v biases, and a shared expert
    (`mlp.shared_expert.*`) gated by sigmoid(`mlp.shared_expert_gate`)."""

    name = "qwen2_moe"
    llmjax_family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    architectures = ("Qwen2MoeForCausalLM",)
    export_name = "Qwen2-MoE"
    qk_norm = "none"
    export_requires = {**{k: v for k, v in Mixtral.export_requires.items()
                          if k != "moe_shared_d_ff"},
                       "qkv_bias": True, "moe_renormalize": (True, False)}

    def to_config(self, hf, tensors):
        Qwen3Moe.to_config(self, hf, tensors)  # the same checks
        cfg = self._moe({**hf, "sliding_window": None}, tensors,
                        hf_get(hf, "moe_intermediate_size", 1408))
        return dataclasses.replace(cfg, qkv_bias=True, moe_shared_d_ff=hf_get(
            hf, "shared_expert_intermediate_size", 0))

    def specs(self, cfg, prefix):
        from llmjax.convert.hf.specs import Spec, linear_specs
        specs = _MlpExperts.specs(self, cfg, prefix)
        d, hd, s = cfg.d_model, cfg.dim_per_head, cfg.moe_shared_d_ff
        for i in range(cfg.num_layers):
            layer, h = f"decoder/layers_{i}", f"{prefix}layers.{i}"
            for ours, theirs, n in (("query", "q", cfg.num_heads), ("key", "k", cfg.kv_heads),
                                    ("value", "v", cfg.kv_heads)):
                specs.append(Spec((f"{layer}/attention/{ours}/bias",),
                                  (f"{h}.self_attn.{theirs}_proj.bias",), (n * hd,),
                                  lambda b, n=n: (b.reshape(n, hd),),
                                  lambda xs: xs[0].reshape(-1)))
            if s:
                for ours, theirs, shape in (("wi_0", "gate_proj", ((d,), (s,))),
                                            ("wi_1", "up_proj", ((d,), (s,))),
                                            ("wo", "down_proj", ((s,), (d,)))):
                    specs += linear_specs(f"{layer}/mlp/shared/{ours}",
                                          f"{h}.mlp.shared_expert.{theirs}", *shape, False)
                specs.append(Spec((f"{layer}/mlp/shared_gate",),
                                  (f"{h}.mlp.shared_expert_gate.weight",), (1, d),
                                  lambda w: (w.T,), lambda xs: xs[0].T))
        return specs

    def hf_config(self, cfg):
        hf = Qwen3Moe.hf_config(self, cfg)
        hf.update({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                   "shared_expert_intermediate_size": cfg.moe_shared_d_ff, "qkv_bias": True})
        return hf
