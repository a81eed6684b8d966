"""Bad inputs give clear errors naming the tensor or field (no torch needed)."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax.config import model_config
from llmjax.convert import ConversionError, export_hf, import_hf
from llmjax.convert.safetensors_io import read_safetensors, write_safetensors
from llmjax.models import init_params


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    cfg = model_config("llama-tiny", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, d_ff=48, max_len=32, tie_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    export_hf(cfg, init_params(cfg, jax.random.key(0)), path)
    return path, cfg


def _copy(src: Path, dst: Path, config=None, tensors=None) -> Path:
    dst.mkdir()
    hf = json.loads((src / "config.json").read_text())
    hf.update(config or {})
    (dst / "config.json").write_text(json.dumps(hf))
    data = {k: np.array(v) for k, v in read_safetensors(src / "model.safetensors").items()}
    if tensors:
        tensors(data)
    write_safetensors(dst / "model.safetensors", data)
    return dst


def test_roundtrip_is_exact(llama_dir):
    path, cfg = llama_dir
    cfg2, params = import_hf(path)
    ref = init_params(cfg, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (cfg2.num_kv_heads, cfg2.d_ff, cfg2.tie_embeddings) == (2, 48, False)


def test_unknown_architecture(llama_dir, tmp_path):
    path = _copy(llama_dir[0], tmp_path / "x", {"architectures": ["MambaForCausalLM"]})
    with pytest.raises(ConversionError, match="MambaForCausalLM"):
        import_hf(path)


def test_missing_tensor(llama_dir, tmp_path):
    path = _copy(llama_dir[0], tmp_path / "x",
                 tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf(path)


def test_shape_mismatch(llama_dir, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    path = _copy(llama_dir[0], tmp_path / "x", tensors=shrink)
    with pytest.raises(ConversionError, match=r"k_proj\.weight.*\(8, 32\).*\(16, 32\)"):
        import_hf(path)


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "longrope", "factor": 8.0}),  # others: test_rope_scaling.py
    ("attention_bias", True),
    ("hidden_act", "gelu"),
])
def test_unsupported_config_field(llama_dir, tmp_path, field, value):
    path = _copy(llama_dir[0], tmp_path / "x", {field: value})
    with pytest.raises(ConversionError, match=field):
        import_hf(path)


def test_unexpected_tensor(llama_dir, tmp_path):
    def extra(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    path = _copy(llama_dir[0], tmp_path / "x", tensors=extra)
    with pytest.raises(ConversionError, match=r"q_proj\.bias"):
        import_hf(path)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ConversionError, match="pickle"):
        import_hf(tmp_path)


def test_export_refuses_what_hf_cannot_hold(tmp_path):
    cfg = model_config("palm-tiny")
    with pytest.raises(ConversionError, match="family"):
        export_hf(cfg, {}, tmp_path)
    cfg = model_config("llama-tiny", vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                       d_ff=48, max_len=32, parallel_block=True)
    with pytest.raises(ConversionError, match="parallel_block"):
        export_hf(cfg, init_params(cfg, jax.random.key(0)), tmp_path)
    cfg = model_config("llama-tiny", vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                       d_ff=48, max_len=32)
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ConversionError, match="export dtype 'int8'"):
        export_hf(cfg, params, tmp_path, dtype="int8")
    for size in ("five", "0GB", -1):
        with pytest.raises(ConversionError, match="shard size"):
            export_hf(cfg, params, tmp_path, max_shard_size=size)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_unknown_gguf_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    from llmjax.convert import import_gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="mamba"):
        import_gguf(path)


def test_cli_reports_conversion_errors_in_one_line(tmp_path, capsys):
    from llmjax.cli import main
    from llmjax.pretrained import PretrainedModel

    cfg = model_config("llama-tiny", vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                       d_ff=48, max_len=32)
    PretrainedModel(cfg, init_params(cfg, jax.random.key(0))).save(tmp_path / "export")
    code = main(["convert", "llmjax-to-hf", str(tmp_path / "export"), str(tmp_path / "hf"),
                 "--max-shard-size", "1XB"])
    assert code == 2
    assert "llmjax: error: shard size '1XB'" in capsys.readouterr().err
