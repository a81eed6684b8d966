"""The API boundary refuses inputs that would give silently wrong results: out-of-range token
ids, impossible sampling arguments, generation past max_len or from an encoder; `llmjax
convert` never overwrites a run or an export without --force; HF exports carry a
tokenizer transformers loads, bos/eos/pad ids and normal file permissions."""
import json
import os
import random
import stat
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import generate as generate_module
from llmjax.cli import main
from llmjax.config import ConfigError, model_config
from llmjax.generate import generate
from llmjax.models import init_params
from llmjax.pretrained import PretrainedModel, from_pretrained

SMALL = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, d_ff=48, max_len=32)


@pytest.fixture(scope="module")
def llama():
    cfg = model_config("llama-tiny", **SMALL)
    return PretrainedModel(cfg, init_params(cfg, jax.random.key(0)))


@pytest.mark.parametrize("ids,match", [
    ([[1, 2, 64]], r"id 64 at position \(0, 2\).*\[0, 64\).*vocab_size=64"),
    ([[1, -1, 3]], r"id -1 at position \(0, 1\).*vocab_size=64"),
    ([5, 2 ** 40], r"id 1099511627776 at position 1"),
    ([[1.5, 2.0]], "must be integers"),
    ([[1, 2], [3]], "different lengths"),
])
def test_logits_refuse_ids_outside_the_vocabulary(llama, ids, match):
    with pytest.raises(ConfigError, match=match):
        llama.logits(ids)


def test_logits_accept_every_valid_id(llama):
    out = llama.logits(np.arange(64).reshape(2, 32))
    assert out.shape == (2, 32, 64) and np.isfinite(out).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=-3), "top_k=-3"),
    (dict(seed=1.5), "seed=1.5"),
])
def test_generate_refuses_bad_arguments_before_compiling(llama, kwargs, match):
    compiled = dict(generate_module._COMPILED)
    with pytest.raises(ConfigError, match=match):
        llama.generate([[1, 2, 3]], **kwargs)
    with pytest.raises(ConfigError, match=match):
        generate(llama.config, llama.params, [[1, 2, 3]], **kwargs)
    assert generate_module._COMPILED == compiled


def test_generate_refuses_prompt_ids_outside_the_vocabulary(llama):
    with pytest.raises(ConfigError, match=r"prompt 1: id 99 at position 2.*vocab_size=64"):
        llama.generate([[1, 2], [3, 4, 99]], max_new_tokens=2)
    with pytest.raises(ConfigError, match="prompt 0: id -2"):
        generate(llama.config, llama.params, np.array([[-2, 1]]), max_new_tokens=2)
    t5 = model_config("t5-tiny", **SMALL)
    with pytest.raises(ConfigError, match="decoder_start_id: id 64"):
        generate(t5, {}, [[1, 2]], max_new_tokens=2, decoder_start_id=64)


def test_generate_past_max_len_names_both_numbers_and_the_fix(llama):
    with pytest.raises(ConfigError, match=r"prompt \(3 tokens\) \+ max_new_tokens \(30\) = 33 "
                                          r"exceeds model.max_len=32.*max_len=N"):
        llama.generate([[1, 2, 3]], max_new_tokens=30)
    gpt = model_config("gpt-tiny", **SMALL)  # learned positions: nothing exists past max_len
    with pytest.raises(ConfigError, match="33 exceeds model.max_len=32"):
        generate(gpt, {}, [[1, 2, 3]], max_new_tokens=30)
    t5 = model_config("t5-tiny", **SMALL)
    with pytest.raises(ConfigError, match="max_new_tokens=40.*max_len=32"):
        generate(t5, {}, [[1, 2, 3]], max_new_tokens=40)


def test_generate_fits_exactly_max_len(llama):
    out = llama.generate([[1, 2, 3]], max_new_tokens=29, eos_id=None)
    assert len(out[0]) == 29 and all(0 <= t < 64 for t in out[0])


def test_an_encoder_only_model_does_not_generate():
    cfg = model_config("bert-tiny", **SMALL)
    with pytest.raises(ConfigError, match="encoder-only"):
        generate(cfg, {}, [[1, 2, 3]], max_new_tokens=2)


@pytest.mark.parametrize("flags,match", [
    (["--max-new-tokens", "-4"], "max_new_tokens=-4"),
    (["--temperature", "-1"], "temperature=-1.0"),
    (["--top-p", "1.5"], "top_p=1.5"),
    (["--top-k", "-1"], "top_k=-1"),
])
def test_cli_generate_checks_arguments_before_loading_the_model(tmp_path, capsys, flags, match):
    code = main(["generate", str(tmp_path / "no-such-model"), "--prompt", "hi", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("llmjax: error:") and match in err and "\n" not in err


def test_cli_generate_past_max_len_is_one_line(llama, tmp_path, capsys):
    from llmjax.convert.tokenizers import HFTokenizer

    tok = HFTokenizer(_byte_tokenizer(tmp_path / "tok"))
    PretrainedModel(llama.config, llama.params, tok).save(tmp_path / "model")
    code = main(["generate", str(tmp_path / "model"), "--prompt", "abc", "--max-new-tokens", "40"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "exceeds model.max_len=32" in err and "\n" not in err


def _byte_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models

    vocab = {chr(ord("a") + i): i for i in range(26)}  # one id per letter
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    return path


# -- llmjax convert output directories -----------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(llama, tmp_path_factory):
    return llama.save(tmp_path_factory.mktemp("export") / "llama")


def test_convert_never_writes_into_a_training_run(export_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "config.yaml").write_text("model: gpt-tiny\n")
    for force in ([], ["--force"]):
        code = main(["convert", "llmjax-to-hf", str(export_dir), str(run), *force])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "training run" in err and "\n" not in err
    assert (run / "config.yaml").read_text() == "model: gpt-tiny\n"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


def test_convert_replaces_an_earlier_export_only_with_force(export_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", "llmjax-to-hf", str(export_dir), str(out)]) == 0
    (out / "tokenizer.json").write_text("{}")  # a stale file of the earlier export
    before = (out / "config.json").read_text()
    capsys.readouterr()
    assert main(["convert", "llmjax-to-hf", str(export_dir), str(out), "--dtype",
                 "bfloat16"]) == 2
    assert "--force" in capsys.readouterr().err and (out / "config.json").read_text() == before
    assert main(["convert", "llmjax-to-hf", str(export_dir), str(out), "--dtype", "bfloat16",
                 "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / "tokenizer.json").exists()
    # an llmjax export is not an HF directory, and other files are not ours to replace
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    for target in (export_dir, other):
        assert main(["convert", "llmjax-to-hf", str(export_dir), str(target), "--force"]) == 2
        assert "new or empty directory" in capsys.readouterr().err
    assert (other / "todo.txt").read_text() == "x" and not (other / "config.json").exists()


def test_hf_to_llmjax_refuses_an_existing_export(export_dir, tmp_path, capsys):
    hf = tmp_path / "hf"
    from_pretrained(export_dir).save_hf(hf)
    assert main(["convert", "hf-to-llmjax", str(hf), str(export_dir)]) == 2
    assert "--force" in capsys.readouterr().err
    out = tmp_path / "again"
    assert main(["convert", "hf-to-llmjax", str(hf), str(out)]) == 0
    assert main(["convert", "hf-to-llmjax", str(hf), str(out), "--force"]) == 0
    np.testing.assert_array_equal(from_pretrained(out).logits([[1, 2, 3]]),
                                  from_pretrained(export_dir).logits([[1, 2, 3]]))


# -- HF export: tokenizer, special ids, permissions ---------------------------------------------

WORDS = ("thou art the king of denmark and i am thy lord who doth protest too much methinks "
         "what light through yonder window breaks it is the east").split()


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A llama-tiny with an llmjax-trained sentencepiece tokenizer, exported to HF."""
    from llmjax.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                                for _ in range(1500)) + "\nÉtude: 東京 2024!\n")
    tok = train_sentencepiece([corpus], root / "tok", vocab_size=400, num_sentinels=4)
    cfg = model_config("llama-tiny", **{**SMALL, "vocab_size": tok.vocab_size})
    model = PretrainedModel(cfg, init_params(cfg, jax.random.key(0)), tok)
    old = os.umask(0o022)
    try:
        out = model.save_hf(root / "hf")
    finally:
        os.umask(old)
    return model, out


def test_hf_export_tokenizer_gives_our_ids_in_transformers(trained_model):
    transformers = pytest.importorskip("transformers")
    model, out = trained_model
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("thou art the king of denmark", "what  light\nthrough yonder\twindow ",
                 "Étude: 東京 2024! zebra", "the [MASK] king <extra_id_1> lord"):
        ids = model.tokenizer.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.decode(ids) == model.tokenizer.decode(ids) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (2, 3, 0)


def test_hf_export_records_special_ids_and_normal_permissions(trained_model):
    _, out = trained_model
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for data in (config, generation):
        assert (data["bos_token_id"], data["eos_token_id"], data["pad_token_id"]) == (2, 3, 0)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_llmjax_export_keeps_an_llmjax_tokenizer(trained_model, tmp_path):
    model, _ = trained_model
    loaded = from_pretrained(model.save(tmp_path / "export"))
    assert loaded.tokenizer is not None
    text = "thou art the king"
    assert loaded.tokenizer.encode(text) == model.tokenizer.encode(text)
