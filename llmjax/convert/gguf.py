"""GGUF (llama.cpp) LLaMA-architecture files -> llmjax, with their BPE tokenizer.

Tensors are dequantised with the `gguf` package (the same routine transformers
uses, so both see identical fp32 weights), renamed to HF LLaMA names, and the
Q/K rows un-permuted: llama.cpp stores each head's rotary pairs interleaved,
HF and llmjax use the half-split (rotate_half) layout. The rest reuses the HF
LLaMA table in llmjax.convert.hf.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from llmjax.config import ModelConfig
from llmjax.errors import ConversionError
from llmjax.convert.hf import FAMILIES, finish, tensors_to_params

Params = dict
SUPPORTED = ("llama",)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Mixtral-architecture files (general.architecture llama with llama.expert_count): stacked
# experts [E, out, in] and the router, under the fused HF names the mixtral table reads.
_EXPERT_NAMES = {"ffn_gate_inp": "mlp.gate.weight", "ffn_gate_exps": "gguf_gate_exps",
                 "ffn_up_exps": "gguf_up_exps", "ffn_down_exps": "mlp.experts.down_proj"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _reader(path: str | os.PathLike):
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - the [hf] extra installs it
        raise ImportError("reading GGUF files needs the `gguf` package: "
                          "pip install 'llmjax[hf]' (or pip install gguf)") from err
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - the reader raises many kinds
        raise ConversionError(f"{path}: not a readable GGUF file ({err})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_metadata(reader) -> dict[str, Any]:
    """Scalar metadata (tokenizer arrays left out)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type",
                                                               "scores")):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001
            continue
    return out


def gguf_config(reader) -> ModelConfig:
    """The llmjax config of a llama-architecture GGUF file."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise ConversionError(f"unknown GGUF architecture {arch!r} (general.architecture); "
                              f"supported: {list(SUPPORTED)}")

    def count(key, default=None):
        """A positive integer field (metadata is untrusted: a 0 or a string must not crash)."""
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ConversionError(f"GGUF metadata field {arch}.{key!r} is missing")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                not 0 < value < 2**40:
            raise ConversionError(f"GGUF metadata field {arch}.{key}={value!r} is not a positive "
                                  f"integer")
        return int(value)

    def number(key, default):
        value = _field(reader, f"{arch}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or \
                not np.isfinite(value) or value <= 0:
            raise ConversionError(f"GGUF metadata field {arch}.{key}={value!r} is not a positive "
                                  f"number")
        return float(value)

    d, heads = count("embedding_length"), count("attention.head_count")
    kv = count("attention.head_count_kv", heads)
    head_dim = count("rope.dimension_count", max(d // heads, 1))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = count("vocab_size", len(tokens) if tokens else None)
    names = {t.name for t in reader.tensors}
    experts = _field(reader, f"{arch}.expert_count", 0) or 0
    moe = {}
    if experts:
        ff = count("feed_forward_length")
        moe = dict(num_experts=count("expert_count"),
                   experts_per_token=count("expert_used_count", 2), expert_d_ff=ff,
                   moe_renormalize=True)
    return ModelConfig(
        family="mixtral" if moe else "llama", architecture="decoder", vocab_size=vocab,
        d_model=d,
        num_layers=count("block_count"), num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, d_ff=count("feed_forward_length"),
        max_len=count("context_length", 2048), norm="rmsnorm",
        norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
        activation="silu", gated_mlp=True, position="rope",
        rope_theta=number("rope.freq_base", 10000.0), use_bias=False,
        tie_embeddings="output.weight" not in names, scan_layers=False, **moe,
        **_rope_scaling(reader, arch, head_dim, number("rope.freq_base", 10000.0)))


# Llama 3.1's rope_scaling, the one llama.cpp's converter turns into a rope_freqs tensor
# without writing the parameters (factor: the tensor's largest entry).
LLAMA3_DEFAULTS = {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
                   "rope_original_max_len": 8192}


def _rope_scaling(reader, arch: str, head_dim: int, theta: float) -> dict[str, Any]:
    """ModelConfig rope_scaling fields from `{arch}.rope.scaling.*` and a `rope_freqs` tensor.

    llama.cpp knows linear (positions / factor, as HF), yarn and longrope; Llama 3.x files
    carry the per-frequency divisors of HF's llama3 scaling as `rope_freqs.weight`, which are
    accepted when they are Llama 3.1's (low 1, high 4, original context
    `{arch}.rope.scaling.original_context_length` or 8192, factor their largest entry)."""
    kind = _field(reader, f"{arch}.rope.scaling.type", "none") or "none"
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if kind == "linear":
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number)) \
                or not factor >= 1:
            raise ConversionError(f"GGUF metadata field {arch}.rope.scaling.factor={factor!r}: "
                                  f"linear RoPE scaling needs a factor >= 1")
        return {"rope_scaling": "linear", "rope_scaling_factor": float(factor)}
    if kind != "none":
        raise ConversionError(f"GGUF metadata field {arch}.rope.scaling.type={kind!r} is not "
                              f"supported: llmjax implements none and linear (and Llama 3's "
                              f"rope_freqs)")
    if freqs is None:
        return {}
    from llmjax.models.rope import static_inv_freq

    divisors = np.asarray(freqs.data, np.float32).reshape(-1)
    fields = {**LLAMA3_DEFAULTS, "rope_scaling": "llama3",
              "rope_scaling_factor": float(divisors.max(initial=1.0))}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if isinstance(original, (int, np.integer)) and original > 0:
        fields["rope_original_max_len"] = int(original)
    candidate = ModelConfig(position="rope", rope_theta=theta, **fields)
    plain = dataclasses.replace(candidate, rope_scaling="none")
    expected = static_inv_freq(plain, head_dim) / static_inv_freq(candidate, head_dim)
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-4):
        raise ConversionError(
            f"GGUF tensor rope_freqs.weight (per-frequency RoPE divisors, shape "
            f"{divisors.shape}) is not Llama 3.1's llama3 scaling (factor "
            f"{fields['rope_scaling_factor']}, low 1, high 4, original context "
            f"{fields['rope_original_max_len']}); convert from the Hugging Face checkpoint, "
            f"whose config.json names the parameters")
    return fields


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows -> HF's half-split rows (per head)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_tensors(reader, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Dequantised fp32 tensors under HF LLaMA names."""
    from gguf.quants import dequantize

    out = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name == "rope_freqs.weight":  # read as model.rope_scaling (gguf_config)
            continue
        match = re.match(r"^blk\.(\d+)\.(\w+)\.weight$", name)
        if match and match.group(2) in _LAYER_NAMES:
            hf = f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
        elif match and match.group(2) in _EXPERT_NAMES and cfg.num_experts:
            hf = f"model.layers.{match.group(1)}.{_EXPERT_NAMES[match.group(2)]}"
        elif name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[name]
        else:
            hf = f"gguf:{name}"  # reported as unexpected by tensors_to_params
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
        if name.endswith("attn_q.weight"):
            w = _unpermute(w, cfg.num_heads)
        elif name.endswith("attn_k.weight"):
            w = _unpermute(w, cfg.kv_heads)
        out[hf] = w
    for name in [n for n in out if n.endswith(".gguf_gate_exps")]:  # gate rows, then up rows
        h = name[: -len(".gguf_gate_exps")]  # model.layers.N
        up = out.pop(f"{h}.gguf_up_exps", None)
        gate = out.pop(name)
        if up is not None:
            out[f"{h}.mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
    return out


def import_gguf(path: str | os.PathLike, scan_layers: bool = True,
                **overrides: Any) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) of a llama-architecture GGUF file (dequantised to fp32);
    Mixtral-architecture files (llama.expert_count) become an MoE model."""
    reader = _reader(path)
    cfg = gguf_config(reader)
    family = FAMILIES["mixtral" if cfg.num_experts else "llama"]
    params = tensors_to_params(family, cfg, gguf_tensors(reader, cfg),
                               source=str(path))
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return finish(cfg, params, scan_layers)


def gguf_tokenizer_json(path_or_reader: Any) -> str:
    """An HF tokenizer.json (byte-level BPE) built from the GGUF tokenizer metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    reader = path_or_reader if hasattr(path_or_reader, "fields") else _reader(path_or_reader)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; "
                              f"supported: ['gpt2'] (byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    specials = [AddedToken(t, special=True, normalized=False)
                for t, kind_ in zip(tokens, types) if kind_ == 3]
    tok.add_special_tokens(specials)
    return tok.to_str()


def gguf_special_tokens(path_or_reader: Any) -> dict[str, str]:
    """bos/eos/unk/pad token strings named in the GGUF metadata."""
    reader = path_or_reader if hasattr(path_or_reader, "fields") else _reader(path_or_reader)
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    out = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None and 0 <= int(value) < len(tokens):
            out[name] = tokens[int(value)]
    return out


def write_gguf_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template) from a GGUF file."""
    import json

    reader = _reader(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(gguf_tokenizer_json(reader), encoding="utf-8")
    config = {f"{k}_token": v for k, v in gguf_special_tokens(reader).items()}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
