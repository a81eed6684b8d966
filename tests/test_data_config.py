"""DataConfig.validate: bad settings name the key and the fix."""
import pytest

from llmjax.data.config import DataConfig, fields_for_kind


def test_default_config_is_valid():
    DataConfig().validate()


def test_unknown_source_names_the_key():
    with pytest.raises(ValueError, match="data.source='hdf5'"):
        DataConfig(source="hdf5").validate()


def test_text_source_without_paths_says_what_to_set():
    with pytest.raises(ValueError, match="data.paths is empty"):
        DataConfig(source="text", data_dir="d", tokenizer="t").validate()


def test_validation_fraction_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="validation_fraction=1.5"):
        DataConfig(validation_fraction=1.5).validate()


def test_seq2seq_needs_input_and_target_fields():
    with pytest.raises(ValueError, match="data.input_field and data.target_field"):
        fields_for_kind(DataConfig(), "seq2seq")
