"""llmjax -> GGUF (llama.cpp): LLaMA-architecture models, Mixtral-style MoE included.

The parameters go through the Hugging Face table (llmjax.convert.hf: the LLaMA / Mixtral
specs, so the names and layouts are the ones `gguf.py` reads back), are renamed to
llama.cpp's tensor names and the Q/K rows permuted to llama.cpp's interleaved rotary
layout (the inverse of gguf.py's un-permute). A Mixtral-style model is a `llama`
architecture file with `llama.expert_count` / `llama.expert_used_count` and per layer the
router `blk.N.ffn_gate_inp` [E, d] and the stacked experts `ffn_gate_exps` / `ffn_up_exps`
[E, I, d], `ffn_down_exps` [E, d, I] (numpy order; ggml lists dimensions reversed), as
llama.cpp's convert_hf_to_gguf.py writes them. llama.cpp's llama architecture has no
shared expert, query/key norm, softmax-without-renormalisation routing, dense layers
between MoE layers nor q/k/v biases: such models are refused, naming the setting.

Weights are written as F32 or F16. Without a byte-level BPE tokenizer (tokenizer.json) the
file says `tokenizer.ggml.model = no_vocab` (llama.cpp loads it; text needs token ids).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llmjax.config import ModelConfig
from llmjax.convert.gguf import _EXPERT_NAMES, _GLOBAL_NAMES, _LAYER_NAMES
from llmjax.convert.hf import FAMILIES, params_to_tensors
from llmjax.convert.hf.specs import require
from llmjax.errors import ConversionError

DTYPES = {"f32": np.float32, "f16": np.float16}
# What llama.cpp's `llama` architecture cannot express: ModelConfig field -> allowed value.
GGUF_REQUIRES = {
    "qkv_bias": False,  # no q/k/v biases in llama.cpp's llama graph
    "qk_norm": "none",  # no query/key norm (OLMoE, Qwen3)
}
MOE_REQUIRES = {
    "moe_every": 1,  # every layer an MoE layer (or none)
    "moe_shared_d_ff": 0,  # no shared expert (Qwen2-MoE)
    "moe_renormalize": True,  # llama.cpp renormalises the top-k weights (Mixtral)
}
WHY = "a llama-architecture GGUF (llama.cpp LLaMA / Mixtral)"


def gguf_family(cfg: ModelConfig) -> ModelConfig:
    """The config as the LLaMA / Mixtral HF table exports it; ConversionError naming the
    setting llama.cpp's llama architecture lacks (checked before any tensor is built)."""
    family = FAMILIES["mixtral" if cfg.num_experts else "llama"]
    for field in ("prompt_tokens", "prefix_tokens", "adapter_dim"):
        require(cfg, field, 0, f"{WHY} (merge or export the PEFT parameters separately)")
    requires = {**family.export_requires, **GGUF_REQUIRES,
                **(MOE_REQUIRES if cfg.num_experts else {})}
    for field, allowed in requires.items():
        require(cfg, field, allowed, WHY)
    # llama.cpp: linear is its own scaling type, llama3 its rope_freqs tensor; it has no
    # dynamic NTK, and its yarn parameters are not HF's.
    require(cfg, "rope_scaling", ("none", "linear", "llama3"), WHY)
    if not cfg.num_experts:
        return dataclasses.replace(cfg, family=family.llmjax_family)
    # Every MLP is an MoE MLP: llama.cpp's feed_forward_length is the expert width.
    return dataclasses.replace(cfg, family=family.llmjax_family, d_ff=cfg.expert_hidden,
                               expert_d_ff=None)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved rows (per head); gguf.py's
    `_unpermute` is its inverse."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, params: Any, dtype: Any = np.float32
                 ) -> dict[str, np.ndarray]:
    """{llama.cpp tensor name: array (numpy order)} of an llmjax tree (scanned or not)."""
    hcfg = gguf_family(cfg)
    family, tensors = params_to_tensors(hcfg, params, np.float32)
    if hcfg.num_experts:  # the per-expert layout HF export writes -> stacked [E, ...]
        tensors = family.import_tensors(dataclasses.replace(hcfg, scan_layers=False), tensors)
    layer_names = {f"{hf}.weight": gg for gg, hf in _LAYER_NAMES.items()}
    layer_names.update({hf: gg for gg, hf in _EXPERT_NAMES.items() if not hf.startswith("gguf_")})
    global_names = {hf: gg for gg, hf in _GLOBAL_NAMES.items()}
    out = {}
    f = hcfg.expert_hidden
    for name, w in tensors.items():
        if name in global_names:
            out[global_names[name]] = w
            continue
        layer, _, rest = name.removeprefix("model.layers.").partition(".")
        if not name.startswith("model.layers.") or not layer.isdigit():
            raise ConversionError(f"tensor {name!r} has no llama.cpp name")
        blk = f"blk.{layer}."
        if rest == "mlp.experts.gate_up_proj":  # [E, 2I, d]: gate rows, then up rows
            out[blk + "ffn_gate_exps.weight"] = w[:, :f]
            out[blk + "ffn_up_exps.weight"] = w[:, f:]
        elif rest in layer_names:
            gg = layer_names[rest].removesuffix(".weight")
            if gg == "attn_q":
                w = _permute(w, hcfg.num_heads)
            elif gg == "attn_k":
                w = _permute(w, hcfg.kv_heads)
            out[f"{blk}{gg}.weight"] = w
        else:
            raise ConversionError(f"tensor {name!r} has no llama.cpp name")
    if cfg.rope_scaling == "llama3":  # per-frequency divisors, as llama.cpp's converter
        out["rope_freqs.weight"] = llama3_rope_freqs(cfg)
    # F16 for the matrices; norms (1-D) and the router stay F32, as llama.cpp's converter.
    return {k: np.ascontiguousarray(v.astype(dtype if v.ndim > 1 and "ffn_gate_inp" not in k
                                             else np.float32))
            for k, v in out.items()}


def llama3_rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs [head_dim/2]: plain inverse frequencies / llama3's."""
    from llmjax.models.rope import static_inv_freq

    plain = dataclasses.replace(cfg, rope_scaling="none")
    return (static_inv_freq(plain, cfg.dim_per_head)
            / static_inv_freq(cfg, cfg.dim_per_head)).astype(np.float32)


def _bpe_tokenizer(tokenizer_dir: Optional[Path]) -> Optional[dict]:
    """GGUF tokenizer fields of a byte-level BPE tokenizer.json (what gguf.py reads back),
    or None when there is none / it is another kind."""
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").is_file():
        return None
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        return None
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until named
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 3 if added.get(tok, {}).get("special") else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def export_gguf(out: str | os.PathLike, cfg: ModelConfig, params: Any, dtype: str = "f32",
                tokenizer_dir: Optional[str | os.PathLike] = None,
                special_ids: Optional[dict] = None, name: str = "", force: bool = False
                ) -> Path:
    """Write `out` (.gguf): a llama-architecture file llama.cpp and gguf.py load."""
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - the [hf] extra installs it
        raise ImportError("writing GGUF files needs the `gguf` package: "
                          "pip install 'llmjax[hf]' (or pip install gguf)") from err
    if dtype not in DTYPES:
        raise ConversionError(f"GGUF dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out} exists: pass --force to replace it")
    tensors = gguf_tensors(cfg, params, DTYPES[dtype])
    hcfg = gguf_family(cfg)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name or f"llmjax {cfg.family}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32"
                         else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(hcfg.d_ff)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_dimension_count(cfg.dim_per_head)
    if cfg.dim_per_head * cfg.num_heads != cfg.d_model:
        writer.add_key_length(cfg.dim_per_head)
        writer.add_value_length(cfg.dim_per_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":  # the length gguf.py reads the rope_freqs back with
        writer.add_rope_scaling_orig_ctx_len(cfg.rope_original_len)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.experts_per_token)
    bpe = _bpe_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None)
    if bpe is None:
        writer.add_tokenizer_model("no_vocab")
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(bpe["tokens"])
        writer.add_token_types(bpe["types"])
        writer.add_token_merges(bpe["merges"])
        for key, value in (special_ids or {}).items():
            adder = getattr(writer, f"add_{key}_token_id", None)
            if adder is not None and value is not None:
                adder(int(value))
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out
