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
