"""Files a user hands us are untrusted: hostile chat templates fail cleanly in the sandbox,
crafted safetensors/GGUF headers fail as one ConversionError (no crash, no huge
allocation), and a GGUF file converts once into a cache that is reused, and rebuilt
(never used) when stale or incomplete."""
import json
import os
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax.config import ConfigError, model_config
from llmjax.convert import ConversionError
from llmjax.convert.safetensors_io import read_hf_tensors, read_safetensors
from llmjax.models import init_params

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
WORDS = ["hi", "there", "user", "assistant", "system", "you", "are", "a", "bot", "hello", "\n",
         "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# LLaMA-2 style: bos/eos tokens, raise_exception, loop controls, namespace, tojson, strftime_now.
LLAMA2 = (
    "{% set ns = namespace(system='') %}"
    "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}{% continue %}{% endif %}"
    "{% if loop.index0 == 0 and ns.system %}{% set content = '<<SYS>>\\n' + ns.system + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}"
    "{% endif %}{% if loop.index0 > 8 %}{% break %}{% endif %}{% endfor %}"
    "{{ '' if strftime_now('%Y') else 'no date' }}{{ {'k': '<tag>'} | tojson if false }}")
HOSTILE = [
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "{{ namespace.__init__.__globals__['sys'].modules['subprocess'].run(['touch', 'MARKER']) }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ self.__init__.__globals__.__builtins__.open('MARKER', 'w').write('x') }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('MARKER', 'w') }}",
    "{{ messages[0].content.__class__.__base__.__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% include 'MARKER' %}",
    "{{ 'x' * 10**10 }}",  # memory before any output
    "{{ [0] * 10**9 }}",
    "{{ ((2**1000)**1000)**1000 }}",  # time and memory
    "{% for %}",  # syntax error
    "{{ not_a_function() }}",
    "{{ raise_exception('roles must alternate') }}",
]


def _tokenizer_dir(path: Path, template, **config) -> Path:
    """A word-level tokenizer.json + tokenizer_config.json that transformers can load too."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + ["<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "pad_token": "<|endoftext|>", "unk_token": "<unk>", "chat_template": template, **config}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_chat_templates_fail_cleanly(tmp_path, monkeypatch, template):
    from llmjax.convert.tokenizers import HFTokenizer

    monkeypatch.chdir(tmp_path)
    tok = HFTokenizer(_tokenizer_dir(tmp_path / "tok", template))
    with pytest.raises(ConversionError) as err:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    message = str(err.value)
    assert str(tmp_path / "tok" / "tokenizer_config.json") in message and "\n" not in message
    assert not (tmp_path / "MARKER").exists()


CONVERSATIONS = [
    [{"role": "user", "content": "hi there"}],
    [{"role": "system", "content": "you are a bot"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi there"}],
]


@pytest.mark.parametrize("template", [CHATML, LLAMA2], ids=["chatml", "llama2"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "system"])
def test_real_templates_render_as_transformers(tmp_path, template, messages):
    transformers = pytest.importorskip("transformers")
    from llmjax.convert.tokenizers import HFTokenizer

    path = _tokenizer_dir(tmp_path / "tok", template)
    ours = HFTokenizer(path).apply_chat_template(messages)
    theirs = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs and "hi there" in ours


def test_raise_exception_in_a_real_template_names_the_file(tmp_path):
    from llmjax.convert.tokenizers import HFTokenizer

    tok = HFTokenizer(_tokenizer_dir(tmp_path / "tok", LLAMA2))
    with pytest.raises(ConversionError, match="tokenizer_config.json.*must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "hello"}])


def test_llmjax_generate_chat_with_a_hostile_template_exits_with_one_line(tmp_path, monkeypatch,
                                                                        capsys):
    """The issue's reproduction: `llmjax generate MODEL --chat` must not run the command."""
    from llmjax.cli import main
    from llmjax.convert.tokenizers import HFTokenizer
    from llmjax.pretrained import PretrainedModel

    cfg = model_config("llama-tiny", vocab_size=len(SPECIALS) + len(WORDS) + 1, d_model=32,
                       num_layers=1, num_heads=4, d_ff=48, max_len=32)
    tok = HFTokenizer(_tokenizer_dir(tmp_path / "tok", HOSTILE[0]))
    PretrainedModel(cfg, init_params(cfg, jax.random.key(0)), tok).save(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    code = main(["generate", str(tmp_path / "model"), "--prompt", "hi", "--chat",
                 "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("llmjax: error:") and "\n" not in err
    assert "sandbox" in err and str(tmp_path / "model" / "tokenizer" / "tokenizer_config.json") \
        in err
    assert not (tmp_path / "MARKER").exists()


# -- safetensors headers ----------------------------------------------------------------------

def _safetensors(path: Path, header, data: bytes = b"\0" * 16, size=None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if size is None else size) + raw + data)
    return path


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize("header,size,match", [
    ({"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 16]}}, None,
     "needs"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 2 ** 62]}}, None, "byte range"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}}, None, "byte range"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}}, None, "byte range"),
    ({"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, None, "shape"),
    ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, None, "shape"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}}, None, "byte range"),
    ({"w": {"dtype": "PICKLE", "shape": [2, 2], "data_offsets": [0, 16]}}, None, "dtype"),
    ({"w": [1, 2]}, None, "not an object"),
    ([1, 2, 3], None, "not a JSON object"),
    (b"[" * 200_000, None, "header"),
    (b"{not json", None, "header"),
    (GOOD, 2 ** 63, "header of"),
    (GOOD, 10 ** 6, "header of"),  # larger than the file
])
def test_crafted_safetensors_headers_fail_as_one_error(tmp_path, header, size, match):
    path = _safetensors(tmp_path / "x.safetensors", header, size=size)
    with pytest.raises(ConversionError, match=match) as err:
        read_safetensors(path)
    assert str(path) in str(err.value)


def test_a_valid_safetensors_file_still_reads(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()
    out = read_safetensors(_safetensors(tmp_path / "x.safetensors", GOOD, data))
    np.testing.assert_array_equal(out["w"], [[0, 1], [2, 3]])


def test_index_shards_cannot_point_outside_the_directory(tmp_path):
    (tmp_path / "m").mkdir()
    _safetensors(tmp_path / "outside.safetensors", GOOD)
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(ConversionError, match="outside.safetensors"):
        read_hf_tensors(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ConversionError, match="weight_map"):
        read_hf_tensors(tmp_path / "m")


def test_config_json_with_unusable_values_names_the_file(tmp_path):
    from llmjax.convert import export_hf, import_hf

    cfg = model_config("llama-tiny", vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                       d_ff=48, max_len=32)
    export_hf(cfg, init_params(cfg, jax.random.key(0)), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    for field, value in (("num_attention_heads", 0), ("hidden_size", "big")):
        (tmp_path / "config.json").write_text(json.dumps({**hf, field: value}))
        with pytest.raises(ConfigError, match="config"):
            import_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ConversionError, match="JSON object"):
        import_hf(tmp_path)


# -- GGUF ---------------------------------------------------------------------------------------

GGUF_TOKENS = SPECIALS + ["h", "i", "hi", "\u0120", "\u0120hi"]  # byte-level BPE pieces
TINY = dict(vocab_size=len(GGUF_TOKENS), d_model=32, num_layers=2, num_heads=4,
            num_kv_heads=2, d_ff=48, max_len=64)


def _write_gguf(path: Path, cfg, params, template=CHATML, heads=None) -> Path:
    """A llama GGUF file (fp32) of `params`, with a byte-level BPE vocabulary and template."""
    gguf = pytest.importorskip("gguf")
    from llmjax.convert.gguf import _GLOBAL_NAMES, _LAYER_NAMES
    from llmjax.convert.hf import params_to_tensors

    _, tensors = params_to_tensors(cfg, params)
    names = {hf: g for g, hf in _GLOBAL_NAMES.items()}
    for i in range(cfg.num_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
                      for g, hf in _LAYER_NAMES.items()})
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("embedding_length", cfg.d_model), ("block_count", cfg.num_layers),
                       ("attention.head_count", cfg.num_heads if heads is None else heads),
                       ("attention.head_count_kv", cfg.kv_heads),
                       ("feed_forward_length", cfg.d_ff), ("context_length", cfg.max_len)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(GGUF_TOKENS)
    w.add_token_merges(["h i", "\u0120 hi"])
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(GGUF_TOKENS) - len(SPECIALS)))
    w.add_bos_token_id(3)
    w.add_eos_token_id(2)
    w.add_chat_template(template)
    for hf, array in tensors.items():
        array = np.asarray(array, np.float32)
        if hf.endswith(("q_proj.weight", "k_proj.weight")):  # HF half-split -> llama.cpp rows
            heads_ = cfg.num_heads if "q_proj" in hf else cfg.kv_heads
            array = array.reshape(heads_, 2, -1, array.shape[-1]).swapaxes(1, 2).reshape(
                array.shape)
        w.add_tensor(names[hf], np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    cfg = model_config("llama-tiny", **TINY, tie_embeddings=False)
    params = init_params(cfg, jax.random.key(1))
    path = _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", cfg, params)
    return path, cfg, params


def test_crafted_gguf_files_fail_as_one_error(tiny_gguf, tmp_path):
    from llmjax.convert import import_gguf

    path, cfg, params = tiny_gguf
    raw = path.read_bytes()
    at = raw.index(b"token_embd.weight") + len(b"token_embd.weight")
    crafted = {}
    b = bytearray(raw)
    struct.pack_into("<Q", b, at + 4, 2 ** 40)  # a tensor dimension of 2**40
    crafted["dim"] = bytes(b)
    b = bytearray(raw)
    struct.pack_into("<Q", b, at + 4 + 8 * 2 + 4, 2 ** 50)  # tensor data offset past the end
    crafted["offset"] = bytes(b)
    b = bytearray(raw)
    struct.pack_into("<Q", b, 16, 2 ** 60)  # 2**60 metadata entries
    crafted["kv"] = bytes(b)
    crafted["truncated"] = raw[: len(raw) * 2 // 3]
    for name, data in crafted.items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
        with pytest.raises(ConversionError, match="GGUF"):
            import_gguf(tmp_path / f"{name}.gguf")
    zero = _write_gguf(tmp_path / "zero.gguf", cfg, params, heads=0)
    with pytest.raises(ConversionError, match="head_count=0"):
        import_gguf(zero)


def _logits(model, ids):
    return np.asarray(model.logits(ids))


def test_gguf_converts_once_then_loads_from_the_cache(tiny_gguf, tmp_path, monkeypatch):
    from llmjax.convert import gguf as gguf_module
    from llmjax.convert.gguf_cache import MARKER
    from llmjax.pretrained import PretrainedModel, from_pretrained

    path, cfg, params = tiny_gguf
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
    calls = []
    real = gguf_module.import_gguf
    monkeypatch.setattr(gguf_module, "import_gguf",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = [[3, 5, 6, 7, 8]]
    want = _logits(PretrainedModel(cfg, params), ids)  # the weights the file was written from

    first = from_pretrained(path)
    np.testing.assert_allclose(_logits(first, ids), want, atol=1e-5)
    entries = [p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith(".")]
    assert len(calls) == 1 and len(entries) == 1 and (entries[0] / MARKER).is_file()
    second = from_pretrained(path, scan_layers=False)
    assert len(calls) == 1  # reused, not dequantised again
    np.testing.assert_allclose(_logits(second, ids), want, atol=1e-5)
    assert second.tokenizer.encode("hi hi") == first.tokenizer.encode("hi hi") == [7, 9]
    assert second.source == str(path)

    (entries[0] / MARKER).unlink()  # an interrupted build: rebuilt, never used
    from_pretrained(path)
    assert len(calls) == 2 and (entries[0] / MARKER).is_file()

    # damaged behind our back (a new file: the loaded models may still map the old one)
    (entries[0] / "params.safetensors").unlink()
    (entries[0] / "params.safetensors").write_bytes(b"\0" * 8)
    np.testing.assert_allclose(_logits(from_pretrained(path), ids), want, atol=1e-5)
    assert len(calls) == 3

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))  # "edited"
    from_pretrained(path)
    assert len(calls) == 4
    left = [p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith(".")]
    assert len(left) == 1 and left[0] != entries[0]  # the stale entry is gone


def test_a_gguf_template_error_names_the_gguf_file(tiny_gguf, tmp_path, monkeypatch):
    from llmjax.pretrained import from_pretrained

    _, cfg, params = tiny_gguf
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path = _write_gguf(tmp_path / "evil.gguf", cfg, params, template=HOSTILE[0])
    model = from_pretrained(path)
    with pytest.raises(ConversionError, match="evil.gguf.*sandbox"):
        model.generate("hi", chat=True, max_new_tokens=2)
    assert not (tmp_path / "MARKER").exists()


def test_broken_tokenizer_files_name_the_file(tmp_path):
    from llmjax.convert.tokenizers import HFTokenizer, SentencePieceModelTokenizer

    path = _tokenizer_dir(tmp_path / "tok", CHATML)
    (path / "tokenizer_config.json").write_text('"just a string"')
    with pytest.raises(ConversionError, match="tokenizer_config.json.*JSON object"):
        HFTokenizer(path)
    (path / "tokenizer_config.json").unlink()
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    with pytest.raises(ConversionError, match="tokenizer.json"):
        HFTokenizer(path)
    (tmp_path / "spiece.model").write_bytes(b"\x08\x96\x01 not a protobuf")
    with pytest.raises(ConversionError, match="spiece.model"):
        SentencePieceModelTokenizer(tmp_path / "spiece.model")
