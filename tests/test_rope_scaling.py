"""RoPE scaling (model.rope_scaling: linear, dynamic NTK, llama3, yarn) against transformers:
one tiny random LlamaForCausalLM per type, run 64 tokens past an original length of 16 or 32 so
the scaling changes every logit; fp32 logits within the HF parity tolerance, export keeps
rope_scaling, and bad configs fail naming the key. Needs the [hf] extra."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax.config import ConfigError, model_config  # noqa: E402
from llmjax.convert.hf.rope import rope_fields  # noqa: E402
from llmjax.errors import ConversionError  # noqa: E402
from llmjax.pretrained import from_pretrained  # noqa: E402

TOL = 1e-4  # as tests/test_convert_hf.py
V, SEQ = 101, 64
IDS = np.random.RandomState(0).randint(3, V, (2, SEQ))
MASK = np.ones_like(IDS)
MASK[1, 50:] = 0  # right padding in the second row

# initializer_range 0.25: sharp attention, so positions move the logits. head_dim 8, theta 500: wavelengths 6.3, 30, 140, 664 tokens. llama3 with original 32,
# low 1, high 4 keeps the first (< 8), smooths the second (8..32), divides the last two.
SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, 16),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, 16),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, 128),
    # beta_slow 0.25: frequency 0 kept, 1 half-way on the ramp, 2 and 3 divided by 4; cos and
    # sin times the default attention factor 0.1 ln 4 + 1.
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
              "beta_slow": 0.25}, 64),
}


def _hf_config(scaling: dict, max_positions: int):
    return transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        rope_theta=500.0, rope_scaling=dict(scaling), rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, initializer_range=0.25)


def _load(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _hf_logits(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _diff(a, b):
    return float(np.abs(a - b)[MASK.astype(bool)].max())


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for kind, (scaling, max_positions) in SCALINGS.items():
        path = tmp_path_factory.mktemp(kind)
        transformers.LlamaForCausalLM(_hf_config(scaling, max_positions)).save_pretrained(path)
        out[kind] = path
    return out


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_logits_match_transformers_and_export_keeps_scaling(kind, hf_dirs, tmp_path):
    hf = _load(hf_dirs[kind])
    ref = _hf_logits(hf)
    model = from_pretrained(hf_dirs[kind])
    cfg = model.config
    assert cfg.rope_scaling == kind and cfg.rope_theta == 500.0
    got = model.logits(IDS, MASK)
    diff = _diff(got, ref)
    print(kind, "import max |diff|", diff)
    assert diff <= TOL

    # The scaling matters here: the same weights with plain RoPE give other logits.
    plain = transformers.LlamaForCausalLM(_hf_config({"rope_type": "default"}, 64)).eval()
    plain.load_state_dict(hf.state_dict())
    assert _diff(_hf_logits(plain), ref) > 100 * TOL

    out = model.save_hf(tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    scaling, _ = SCALINGS[kind]
    for key, value in scaling.items():
        assert written["rope_scaling"][key] == value
        assert written["rope_parameters"][key] == value
    back_hf = _load(out)
    assert back_hf.config.rope_parameters["rope_type"] == kind
    back_diff = _diff(_hf_logits(back_hf), got)
    print(kind, "export max |diff|", back_diff)
    assert back_diff <= TOL
    back = from_pretrained(out)
    fields = ("rope_scaling", "rope_scaling_factor", "rope_original_len", "rope_theta",
              "rope_low_freq_factor", "rope_high_freq_factor", "rope_yarn_beta_fast",
              "rope_yarn_beta_slow", "rope_attention_factor")
    assert [getattr(back.config, f) for f in fields] == [getattr(cfg, f) for f in fields]
    if kind == "yarn":
        assert cfg.rope_yarn_beta_slow == 0.25 and cfg.rope_original_len == 16


def test_dynamic_ntk_follows_the_length_of_each_call(hf_dirs):
    """Dynamic NTK rescales only past the original 16 positions: a 12-token call gets plain
    RoPE (as in transformers), and greedy KV-cache decoding past 16 tokens, where every step
    has a new base, gives transformers' tokens."""
    hf = _load(hf_dirs["dynamic"])
    model = from_pretrained(hf_dirs["dynamic"])
    short = IDS[:, :12]
    assert np.abs(model.logits(short) - _hf_logits(hf, short, np.ones_like(short))).max() <= TOL
    prompt = [int(t) for t in IDS[0, :14]]
    got = model.generate([prompt], max_new_tokens=4, eos_id=None)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref


def test_old_style_rope_scaling_dict_reads_the_same():
    """transformers < 5 configs: top-level rope_theta, rope_scaling with `type`."""
    old = {"rope_theta": 1e4, "max_position_embeddings": 64,
           "rope_scaling": {"type": "linear", "factor": 2.0}}
    new = {"max_position_embeddings": 64,
           "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
    assert rope_fields(old, "llama") == rope_fields(new, "llama") == {
        "rope_theta": 1e4, "rope_scaling": "linear", "rope_scaling_factor": 2.0}


def test_yarn_mscale_pair_folds_into_the_attention_factor():
    """DeepSeek-style yarn (mscale, mscale_all_dim) is stored as its attention factor."""
    import math
    fields = rope_fields({"max_position_embeddings": 4096, "rope_scaling": {
        "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
        "mscale": 1.0, "mscale_all_dim": 0.5}}, "llama")
    want = (0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1)
    assert fields["rope_attention_factor"] == pytest.approx(want)
    assert (fields["rope_yarn_beta_fast"], fields["rope_yarn_beta_slow"]) == (32.0, 1.0)


@pytest.mark.parametrize("hf, message", [
    ({"rope_scaling": {"rope_type": "proportional", "factor": 4.0}}, "rope_type='proportional'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": False}}, "truncate"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_type='longrope'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "'rope_scaling.factor' is missing"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
     "'rope_scaling.high_freq_factor' is missing"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": "x"}}, "'rope_scaling.factor'='x'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_hf_rope_is_a_conversion_error(hf, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        rope_fields({"max_position_embeddings": 64, **hf}, "llama")


@pytest.mark.parametrize("fields, key", [
    ({"rope_scaling": "longrope"}, "model.rope_scaling"),
    ({"rope_scaling": "yarn", "rope_yarn_beta_slow": 40.0}, "model.rope_yarn_beta_fast"),
    ({"rope_scaling": "yarn", "rope_attention_factor": 0.0}, "model.rope_attention_factor"),
    ({"rope_scaling": "linear", "rope_scaling_factor": 0.5}, "model.rope_scaling_factor"),
    ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0}, "model.rope_low_freq_factor"),
    ({"rope_scaling": "dynamic", "rope_original_max_len": 0}, "model.rope_original_max_len"),
    ({"rope_scaling": "linear", "position": "learned"}, "model.rope_scaling=linear"),
])
def test_bad_rope_scaling_config_names_the_key(fields, key):
    with pytest.raises(ConfigError, match=key):
        model_config("llama-tiny", **fields).validate()


def _gguf_config(path, scaling: dict, freqs=None):
    """gguf_config of a header-only llama GGUF (head_dim 8, theta 5e5) with rope metadata."""
    gguf = pytest.importorskip("gguf")
    from llmjax.convert.gguf import _reader, gguf_config, gguf_tensors

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("embedding_length", 32), ("block_count", 1), ("feed_forward_length", 48),
                       ("attention.head_count", 4), ("context_length", 131072),
                       ("vocab_size", V)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", 5e5)
    for key, value in scaling.items():
        (w.add_string if isinstance(value, str) else w.add_float32)(f"llama.rope.scaling.{key}",
                                                                    value)
    if freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = _reader(path)
    cfg = gguf_config(reader)
    assert not gguf_tensors(reader, cfg)  # rope_freqs is config, not a weight
    return cfg


def _llama_cpp_rope_freqs(theta, dim, factor, low, high, original):
    """The rope_freqs tensor llama.cpp's convert_hf_to_gguf.py writes for llama3 scaling."""
    import math
    out = []
    for freq in 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def test_gguf_rope_scaling_metadata_and_llama3_rope_freqs(tmp_path):
    cfg = _gguf_config(tmp_path / "linear.gguf", {"type": "linear", "factor": 4.0})
    assert (cfg.rope_scaling, cfg.rope_scaling_factor) == ("linear", 4.0)
    # Llama 3.1 (factor 8, low 1, high 4, original 8192); theta 5e5 and head_dim 8 give
    # wavelengths 6, 167 (kept), 4450 (smoothed), 118000 (divided by 8).
    freqs = _llama_cpp_rope_freqs(5e5, 8, 8.0, 1.0, 4.0, 8192)
    assert freqs[0] == 1.0 and 1 < freqs[2] < 8 and freqs[3] == 8.0
    cfg = _gguf_config(tmp_path / "llama3.gguf", {}, freqs)
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_len,
            cfg.rope_low_freq_factor, cfg.rope_high_freq_factor) == ("llama3", 8.0, 8192, 1, 4)
    with pytest.raises(ConversionError, match="rope_freqs.weight"):  # not Llama 3.1's bands
        _gguf_config(tmp_path / "other.gguf", {}, _llama_cpp_rope_freqs(5e5, 8, 8.0, 1.0, 2.0,
                                                                        8192))
    with pytest.raises(ConversionError, match=r"rope\.scaling\.type='yarn'"):
        _gguf_config(tmp_path / "yarn.gguf", {"type": "yarn", "factor": 4.0})


@pytest.mark.parametrize("scaling", [
    {"rope_scaling": "linear", "rope_scaling_factor": 4.0},
    {"rope_scaling": "llama3", "rope_scaling_factor": 8.0, "rope_original_max_len": 8192},
    {"rope_scaling": "llama3", "rope_scaling_factor": 32.0, "rope_original_max_len": 512},
])
def test_gguf_export_keeps_rope_scaling(scaling, tmp_path):
    """llmjax-to-gguf writes linear as llama.rope.scaling.*, llama3 as rope_freqs (+ the
    original length); gguf-to-llmjax reads the same model back."""
    pytest.importorskip("gguf")
    import jax

    from llmjax.convert import export_gguf, import_gguf
    from llmjax.models import init_params

    cfg = model_config("llama-tiny", rope_theta=5e5, scan_layers=False, **scaling)
    params = init_params(cfg, jax.random.key(0))
    back, back_params = import_gguf(export_gguf(tmp_path / "m.gguf", cfg, params),
                                    scan_layers=False)
    fields = ("rope_scaling", "rope_scaling_factor", "rope_original_len", "rope_theta",
              "rope_low_freq_factor", "rope_high_freq_factor")
    assert [getattr(back, f) for f in fields] == [getattr(cfg, f) for f in fields]
    for a, b in zip(jax.tree.leaves(back_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])
def test_gguf_export_refuses_scaling_llama_cpp_lacks(kind, tmp_path):
    pytest.importorskip("gguf")
    from llmjax.convert import export_gguf

    cfg = model_config("llama-tiny", rope_scaling=kind, rope_scaling_factor=2.0)
    with pytest.raises(ConversionError, match="model.rope_scaling"):
        export_gguf(tmp_path / "m.gguf", cfg, {})
    assert not (tmp_path / "m.gguf").exists()
