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
