"""GGUF export of LLaMA / Mixtral-style models (issue 17, llmjax/convert/gguf_export.py):
moe-tiny and llama-tiny round-trip through llmjax's GGUF import with equal logits, the file's
tensor names and shapes are those llama.cpp's llama architecture declares, and MoE variants
llama.cpp cannot express are refused naming the setting. (Against a file written by hand
from a transformers Mixtral: tests/test_convert_moe.py.)"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import from_dict
from llmjax.errors import ConversionError
from helpers import initial_params, jitted_apply

gguf = pytest.importorskip("gguf")

TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 12)))


def llama_cpp_shapes(cfg):
    """ggml shapes (ne: numpy's reversed) llama.cpp's llama architecture creates, per name
    (llama-model.cpp, LLM_ARCH_LLAMA; the experts when n_expert > 0)."""
    d, hd, ff, e = cfg.d_model, cfg.dim_per_head, cfg.expert_hidden, cfg.num_experts
    shapes = {"token_embd.weight": [d, cfg.vocab_size], "output_norm.weight": [d],
              "output.weight": [d, cfg.vocab_size]}
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": [d], b + "ffn_norm.weight": [d],
                       b + "attn_q.weight": [d, hd * cfg.num_heads],
                       b + "attn_k.weight": [d, hd * cfg.kv_heads],
                       b + "attn_v.weight": [d, hd * cfg.kv_heads],
                       b + "attn_output.weight": [hd * cfg.num_heads, d]})
        if e:
            shapes.update({b + "ffn_gate_inp.weight": [d, e],
                           b + "ffn_gate_exps.weight": [d, ff, e],
                           b + "ffn_up_exps.weight": [d, ff, e],
                           b + "ffn_down_exps.weight": [ff, d, e]})
        else:
            shapes.update({b + "ffn_gate.weight": [d, cfg.d_ff], b + "ffn_up.weight": [d, cfg.d_ff],
                           b + "ffn_down.weight": [cfg.d_ff, d]})
    return shapes


@pytest.mark.parametrize("preset", ["moe-tiny", "llama-tiny"])
def test_gguf_export_round_trips_with_llama_cpp_names(preset, tmp_path):
    from llmjax.convert import import_gguf
    from llmjax.convert.gguf_export import export_gguf
    cfg = from_dict({"model": preset}).model
    params = initial_params(cfg)
    out = export_gguf(tmp_path / "m.gguf", cfg, params)
    reader = gguf.GGUFReader(str(out))
    assert {t.name: [int(n) for n in t.shape] for t in reader.tensors} == llama_cpp_shapes(cfg)
    names = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight"
             for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA] for i in range(cfg.num_layers)}
    assert {t.name for t in reader.tensors} <= names  # gguf's table of the llama architecture
    assert reader.fields["general.architecture"].contents() == "llama"
    if cfg.num_experts:
        assert reader.fields["llama.expert_count"].contents() == cfg.num_experts
        assert reader.fields["llama.expert_used_count"].contents() == cfg.experts_per_token
    back, params_back = import_gguf(out)
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "kv_heads", "dim_per_head",
                  "num_experts", "experts_per_token", "expert_hidden", "moe_renormalize",
                  "rope_theta", "tie_embeddings", "family"):
        assert getattr(back, field) == getattr(cfg, field), field
    assert back.norm_eps == pytest.approx(cfg.norm_eps, rel=1e-7)  # stored as float32
    # The imported tree under the original config (the same function, one compile).
    want = jitted_apply(cfg)(params, {"tokens": TOKENS})["logits"]
    got = jitted_apply(cfg)(params_back, {"tokens": TOKENS})["logits"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ConversionError, match="--force"):
        export_gguf(out, cfg, params)
    # f16 matrices: the same model up to half precision (norms and router stay f32).
    half = gguf.GGUFReader(str(export_gguf(tmp_path / "h.gguf", cfg, params, dtype="f16")))
    types = {t.name: t.tensor_type.name for t in half.tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    if cfg.num_experts:
        assert types["blk.0.ffn_gate_inp.weight"] == "F32"


@pytest.mark.parametrize("change, named", [
    ({"qk_norm": "full"}, "qk_norm"),  # OLMoE
    ({"moe_shared_d_ff": 16}, "moe_shared_d_ff"),  # Qwen2-MoE's shared expert
    ({"moe_renormalize": False}, "moe_renormalize"),  # OLMoE / Qwen2-MoE routing
    ({"moe_every": 2, "scan_layers": False}, "moe_every"),
    ({"qkv_bias": True}, "qkv_bias"),
])
def test_unsupported_moe_variants_name_the_setting(change, named, tmp_path):
    from llmjax.convert.gguf_export import export_gguf
    cfg = dataclasses.replace(from_dict({"model": "moe-tiny"}).model, **change)
    with pytest.raises(ConversionError, match=f"model.{named}=.*llama-architecture GGUF"):
        export_gguf(tmp_path / "m.gguf", cfg, params=None)
    assert not (tmp_path / "m.gguf").exists()


def test_cli_names_bad_paths(tmp_path, capsys):
    from llmjax import cli
    out = str(tmp_path / "m.gguf")
    assert cli.main(["convert", "llmjax-to-gguf", str(tmp_path), out]) == 2
    assert "no config.yaml (not an llmjax export)" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("model: moe-tiny\n")
    assert cli.main(["convert", "llmjax-to-gguf", str(tmp_path), str(tmp_path / "m.bin")]) == 2
    assert "must end in .gguf" in capsys.readouterr().err


def test_bpe_tokenizer_travels_in_the_gguf_file(tmp_path):
    """A byte-level BPE tokenizer.json goes into the file (tokenizer.ggml.model gpt2) and
    llmjax's GGUF tokenizer reader rebuilds one that encodes alike, special tokens too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmjax.convert.gguf import gguf_special_tokens, gguf_tokenizer_json
    from llmjax.convert.gguf_export import export_gguf
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Mixture of experts routes every token to two experts. " * 20,
                             "Experts are SwiGLU MLPs; the router is a linear map. " * 20],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    cfg = from_dict({"model": "llama-tiny"}).model
    out = export_gguf(tmp_path / "m.gguf", cfg, initial_params(cfg), tokenizer_dir=tmp_path / "tok",
                      special_ids={"bos": 0, "eos": 1})
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    back = Tokenizer.from_str(gguf_tokenizer_json(reader))
    for text in ("Mixture of experts routes every token.", "<s>Zebra 123 ünïcode</s>"):
        assert back.encode(text).ids == tok.encode(text).ids, text
    assert gguf_special_tokens(reader) == {"bos": "<s>", "eos": "</s>"}
