"""Tokenizer: stable special ids, exact round trips (English and Chinese), metadata, clear errors."""
import json
import pathlib
import random

import pytest

from llmjax.data.tokenizer import METADATA_FILE, load_tokenizer, train_sentencepiece

ZH_SAMPLE = pathlib.Path(__file__).parent / "data" / "zh_sample.txt"
WORDS = ("thou art the king of denmark and i am thy lord who doth protest too much methinks "
         "what light through yonder window breaks it is the east").split()


def _english(path: pathlib.Path, lines: int = 6000) -> pathlib.Path:
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(lines))
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    english = _english(root / "english.txt")
    out = root / "tok"
    train_sentencepiece([english, ZH_SAMPLE], out, vocab_size=600, model_type="bpe", num_sentinels=100)
    return out


def test_special_ids_are_stable(trained):
    tokenizer = load_tokenizer(trained)
    pieces = [tokenizer.id_to_piece(i) for i in range(8)] + [tokenizer.id_to_piece(106)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>", "[MASK]", "[CLS]", "[SEP]", "<extra_id_0>", "<extra_id_99>"]
    special = tokenizer.special_ids
    assert (special["pad"], special["unk"], special["bos"], special["eos"]) == (0, 1, 2, 3)
    assert (special["mask"], special["cls"], special["sep"], special["sentinel_start"]) == (4, 5, 6, 7)
    assert special["num_sentinels"] == 100 and special["num_special"] == 107


def test_metadata_next_to_model_records_special_ids(trained):
    metadata = json.loads((trained / METADATA_FILE).read_text(encoding="utf-8"))
    assert (trained / metadata["model_file"]).is_file()
    assert metadata["special_ids"]["sep"] == 6 and metadata["vocab_size"] == 600


def test_round_trip_is_exact_with_odd_whitespace(trained):
    tokenizer = load_tokenizer(trained)
    text = "  Thou art\tthe KING;\n\n  of   Denmark!  \nzebra quux 42 "
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chinese_text_round_trips(trained):
    tokenizer = load_tokenizer(trained)
    text = ZH_SAMPLE.read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # real pieces, not only byte fallback


def test_unseen_characters_use_byte_fallback_not_unk(trained):
    tokenizer = load_tokenizer(trained)
    text = "鬱 😀 𝔘"
    ids = tokenizer.encode(text)
    assert 1 not in ids and tokenizer.decode(ids) == text


def test_vocab_too_small_names_the_minimum(tmp_path):
    with pytest.raises(ValueError, match="at least 364"):
        train_sentencepiece([_english(tmp_path / "e.txt", 50)], tmp_path / "tok", vocab_size=300)


def test_missing_tokenizer_dir_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="llmjax tokenizer train"):
        load_tokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("model_file", ["../outside.model", "/etc/passwd", "sub/spm.model", "..",
                                        "", 7])
def test_model_file_outside_the_tokenizer_dir_is_refused(trained, tmp_path, model_file):
    import shutil

    from llmjax.config import ConfigError
    tok = tmp_path / "tok"
    shutil.copytree(trained, tok)
    metadata = json.loads((tok / METADATA_FILE).read_text(encoding="utf-8"))
    (tmp_path / "outside.model").write_bytes((trained / metadata["model_file"]).read_bytes())
    metadata["model_file"] = model_file
    (tok / METADATA_FILE).write_text(json.dumps(metadata), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"llmjax_tokenizer.json: model_file must be a plain "
                                          r"file name"):
        load_tokenizer(tok)


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"kind": "sentencepiece", "model_file": "spm.model", "special_ids": {"pad": "0"}}',
     "special_ids must map token roles to non-negative integer ids"),
    ('{"kind": "sentencepiece", "model_file": "spm.model", "special_ids": {"evil": 1}}',
     r"unknown special_ids \['evil'\]"),
])
def test_malformed_metadata_is_one_error_naming_the_file(tmp_path, content, match):
    from llmjax.config import ConfigError
    (tmp_path / METADATA_FILE).write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{METADATA_FILE}: {match}"):
        load_tokenizer(tmp_path)
