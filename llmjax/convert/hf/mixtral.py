"""Mixtral: LLaMA attention and norms, an MoE MLP of SwiGLU experts (top-k, renormalised).

Expert weights come in two layouts; both import:
  per-expert (what save_pretrained writes): `layers.N.block_sparse_moe.experts.E.w1/w2/w3`
    (gate, down, up; [out, in] each) and the router `block_sparse_moe.gate.weight` [E, d];
  fused (transformers >= 5 modules): `layers.N.mlp.experts.gate_up_proj` [E, 2I, d],
    `down_proj` [E, d, I], router `mlp.gate.weight`.
The table (specs) is written in the fused layout; `import_tensors` stacks per-expert
tensors into it, and export writes the per-expert layout (`export_tensors`).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from llmjax.convert.hf.family import register
from llmjax.convert.hf.llama import Llama
from llmjax.convert.hf.specs import Spec, hf_get, unsupported



def expert_specs(layer: str, h: str, e: int, d: int, f: int) -> list[Spec]:
    """Router and experts of one layer in the fused layout."""
    return [
        Spec((f"{layer}/mlp/router",), (f"{h}.mlp.gate.weight",), (e, d),
             lambda w: (w.T,), lambda xs: xs[0].T),
        # gate_up [E, 2f, d]: rows :f the gate (wi_0), f: the up projection (wi_1).
        Spec((f"{layer}/mlp/wi_0", f"{layer}/mlp/wi_1"), (f"{h}.mlp.experts.gate_up_proj",),
             (e, 2 * f, d),
             lambda w: (w[:, :f].transpose(0, 2, 1), w[:, f:].transpose(0, 2, 1)),
             lambda xs: np.concatenate(xs, axis=2).transpose(0, 2, 1)),
        Spec((f"{layer}/mlp/wo",), (f"{h}.mlp.experts.down_proj",), (e, d, f),
             lambda w: (w.transpose(0, 2, 1),), lambda xs: xs[0].transpose(0, 2, 1)),
    ]


@register
class Mixtral(Llama):
    name = "mixtral"
    llmjax_family = "mixtral"
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)
    export_name = "Mixtral"

    def to_config(self, hf, tensors):
        unsupported(hf, "sliding_window", lambda v: not v, None, "mixtral",
                    "sliding-window attention is not implemented")
        base = Llama.to_config(self, {**hf, "attention_bias": False, "mlp_bias": False},
                               tensors)
        k = hf.get("num_experts_per_tok", 2)
        ff = hf.get("intermediate_size", 14336)
        return dataclasses.replace(
            base, family="mixtral", num_experts=hf.get("num_local_experts", 8),
            experts_per_token=k, d_ff=ff, expert_d_ff=ff, moe_renormalize=True,
            # HF's auxiliary loss sums f_i P_i over the k choices too: k times ours.
            router_balance_weight=float(hf_get(hf, "router_aux_loss_coef", 0.001)) * k,
            router_z_weight=0.0)

    def specs(self, cfg, prefix):
        specs = [s for s in Llama.specs(self, cfg, prefix) if "/mlp/" not in s.paths[0]]
        for i in range(cfg.num_layers):
            layer, h = f"decoder/layers_{i}", f"{prefix}layers.{i}"
            specs += expert_specs(layer, h, cfg.num_experts, cfg.d_model, cfg.expert_hidden)
            if cfg.qk_norm != "none":  # OLMoE (all features), Qwen3-MoE (per head)
                for ours, theirs, n in (("query", "q", cfg.num_heads), ("key", "k", cfg.kv_heads)):
                    width = cfg.dim_per_head * (n if cfg.qk_norm == "full" else 1)
                    specs.append(Spec((f"{layer}/attention/{ours}_norm/scale",),
                                      (f"{h}.self_attn.{theirs}_norm.weight",), (width,),
                                      lambda w: (w,), lambda xs: xs[0]))
        return specs

    # The per-expert layout save_pretrained writes: the MoE block's name, and the gate, up
    # and down projections' names.
    block = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")

    def import_tensors(self, cfg, tensors):
        """Stack a per-expert checkpoint into the fused layout the table reads."""
        gate, up, down = self.expert_names
        per_expert = re.compile(rf"^(.*layers\.\d+)\.{self.block}\.experts\.(\d+)\."
                                rf"({gate}|{up}|{down})\.weight$")
        found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
        rest = {}
        for name, array in tensors.items():
            m = per_expert.match(name)
            if m:
                found.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = array
            else:
                rest[name.replace(f".{self.block}.gate.", ".mlp.gate.")] = array
        for h, experts in found.items():
            order = [experts[e] for e in sorted(experts)]
            rest[f"{h}.mlp.experts.gate_up_proj"] = np.stack(
                [np.concatenate([np.asarray(x[gate]), np.asarray(x[up])]) for x in order])
            rest[f"{h}.mlp.experts.down_proj"] = np.stack([np.asarray(x[down]) for x in order])
        return rest

    def export_tensors(self, cfg, tensors):
        """The per-expert layout save_pretrained writes (every transformers version loads)."""
        gate, up, down = self.expert_names
        out = {}
        f = cfg.expert_hidden
        for name, array in tensors.items():
            if name.endswith(".mlp.experts.gate_up_proj"):
                h = name[: -len(".mlp.experts.gate_up_proj")]
                for e in range(array.shape[0]):
                    out[f"{h}.{self.block}.experts.{e}.{gate}.weight"] = array[e, :f]
                    out[f"{h}.{self.block}.experts.{e}.{up}.weight"] = array[e, f:]
            elif name.endswith(".mlp.experts.down_proj"):
                h = name[: -len(".mlp.experts.down_proj")]
                for e in range(array.shape[0]):
                    out[f"{h}.{self.block}.experts.{e}.{down}.weight"] = array[e]
            else:
                out[name.replace(".mlp.gate.weight", f".{self.block}.gate.weight")] = array
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    export_requires = {**Llama.export_requires, "moe_every": 1, "moe_shared_d_ff": 0,
                       "moe_renormalize": True, "qk_norm": "none"}

    def check_export(self, cfg):
        super().check_export(cfg)
        from llmjax.convert.hf.specs import require
        require(cfg, "expert_d_ff", (None, cfg.d_ff), "Mixtral (expert width = d_ff)")

    def hf_config(self, cfg):
        hf = Llama.hf_config(self, cfg)
        for key in ("attention_bias", "mlp_bias"):
            hf.pop(key)
        k = cfg.experts_per_token
        hf.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                   "intermediate_size": cfg.expert_hidden, "num_local_experts": cfg.num_experts,
                   "num_experts_per_tok": k, "sliding_window": None,
                   "router_aux_loss_coef": cfg.router_balance_weight / k})
        return hf
