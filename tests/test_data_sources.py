"""Sources: the local-text TFDS builder, catalogue datasets by name, and bad input."""
import pytest

from llmjax.data.config import DataConfig
from llmjax.data.sources import open_source, open_tfds, prepare_text_dataset


def _write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    _write(texts / "a.txt", "first para\nstill first\n\n\nsecond para\n")
    _write(texts / "b.txt", "third para\n\nfourth para")
    _write(texts / "held.txt", "held out one\n\nheld out two")
    return texts


def _config(texts, tmp_path, **overrides):
    values = dict(source="text", paths=[str(texts / "*.txt")], validation_paths=[str(texts / "held.txt")],
                  document_unit="paragraph", data_dir=str(tmp_path / "tfds"), tokenizer="unused")
    values.update(overrides)
    return DataConfig(**values)


def test_paragraph_documents_and_validation_files_are_split(corpus, tmp_path):
    config = _config(corpus, tmp_path)
    train, validation = open_source(config, "train"), open_source(config, "validation")
    assert sorted(train[i]["text"] for i in range(len(train))) == sorted(
        ["first para\nstill first", "second para\n", "third para", "fourth para"])
    assert sorted(validation[i]["text"] for i in range(len(validation))) == ["held out one", "held out two"]


def test_file_documents_keep_whole_files(corpus, tmp_path):
    config = _config(corpus, tmp_path, document_unit="file", validation_paths=[])
    train = open_source(config, "train")
    assert sorted(train[i]["text"] for i in range(len(train))) == sorted(
        (corpus / name).read_text() for name in ("a.txt", "b.txt", "held.txt"))


def test_validation_fraction_holds_out_documents_disjointly(corpus, tmp_path):
    config = _config(corpus, tmp_path, validation_paths=[], validation_fraction=0.3)
    train, validation = open_source(config, "train"), open_source(config, "validation")
    train_texts = {train[i]["text"] for i in range(len(train))}
    validation_texts = {validation[i]["text"] for i in range(len(validation))}
    assert len(validation_texts) == 2 and not train_texts & validation_texts
    assert len(train_texts) + len(validation_texts) == 6


def test_empty_file_is_a_counted_skip(corpus, tmp_path):
    _write(corpus / "empty.txt", "  \n\n ")
    _, stats = prepare_text_dataset(_config(corpus, tmp_path))
    assert stats["train"]["skipped_empty_files"] == [str(corpus / "empty.txt")]
    assert stats["train"]["documents"] == 4


def test_invalid_utf8_is_replaced_and_counted(corpus, tmp_path):
    _write(corpus / "bad.txt", b"good text \xff\xfe then more")
    config = _config(corpus, tmp_path)
    _, stats = prepare_text_dataset(config)
    assert stats["train"]["invalid_utf8_files"] == [str(corpus / "bad.txt")]
    assert stats["train"]["replaced_invalid_bytes"] == 2
    train = open_source(config, "train")
    assert "good text \ufffd\ufffd then more" in {train[i]["text"] for i in range(len(train))}


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    config = _config(tmp_path, tmp_path, paths=[str(tmp_path / "none*.txt")], validation_paths=[])
    with pytest.raises(FileNotFoundError, match="none\\*.txt"):
        open_source(config, "train")


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_tfds("lm1b", str(tmp_path / "missing"), "train")


def test_unknown_dataset_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no dataset 'lm1bb'.*Did you mean lm1b"):
        open_tfds("lm1bb", str(tmp_path), "train")


def test_unprepared_catalogue_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build lm1b"):
        open_tfds("lm1b", str(tmp_path), "train")


def test_catalogue_dataset_by_name_reads_a_prepared_data_dir(corpus, tmp_path):
    config = _config(corpus, tmp_path)
    builder, _ = prepare_text_dataset(config)
    name = f"{builder.name}/{builder.builder_config.name}"
    tfds_config = DataConfig(source="tfds", name=name, data_dir=config.data_dir, tokenizer="unused",
                             text_field="path")
    source = open_source(tfds_config, "validation", fields=["path"])
    assert [source[i]["path"] for i in range(len(source))] == [str(corpus / "held.txt")] * 2


def test_missing_field_lists_the_available_ones(corpus, tmp_path):
    config = _config(corpus, tmp_path)
    builder, _ = prepare_text_dataset(config)
    with pytest.raises(ValueError, match=r"no field\(s\) \['content'\].*\['path', 'text'\]"):
        open_tfds(f"{builder.name}/{builder.builder_config.name}", config.data_dir, "train", ["content"])


def test_asking_for_absent_validation_split_says_how_to_add_one(corpus, tmp_path):
    config = _config(corpus, tmp_path, validation_paths=[])
    with pytest.raises(ValueError, match="validation_fraction"):
        open_source(config, "validation")
