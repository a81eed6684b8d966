"""Typed config: YAML files, dotted overrides, and errors that name the key (issue 2)."""
from __future__ import annotations

import pytest
import yaml

from llmjax.config import (Config, ConfigError, ModelConfig, apply_override, from_dict, load,
                           model_config, preset_names)


def load_error(*overrides: str, path=None) -> str:
    with pytest.raises(ConfigError) as err:
        load(path, ["model=gpt-tiny", *overrides])
    return str(err.value)


# ----------------------------------------------------------------------------
# Loading and overriding.

def test_yaml_file_and_dotted_overrides_set_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "llama-tiny", "num_layers": 3},
        "train": {"steps": 11, "batch_size": 4},
        "optimizer": {"learning_rate": 0.01},
    }))
    cfg = load(path, ["model.d_model=128", "train.steps=7", "optimizer.learning_rate=2e-3",
                      "model.scan_layers=false", "model.remat=dots"])
    assert isinstance(cfg, Config) and isinstance(cfg.model, ModelConfig)
    assert cfg.model.family == "llama"  # from the preset
    assert cfg.model.num_kv_heads == 2  # from the preset
    assert cfg.model.num_layers == 3  # from the file
    assert cfg.train.batch_size == 4  # from the file
    assert cfg.model.d_model == 128  # overrides win over file and preset
    assert cfg.train.steps == 7
    assert cfg.optimizer.learning_rate == pytest.approx(2e-3)
    assert cfg.model.scan_layers is False
    assert cfg.model.remat == "dots"


def test_model_given_as_preset_name_then_overridden():
    cfg = load(None, ["model=bert-tiny", "model.num_layers=5"])
    assert cfg.model.family == "bert" and cfg.model.num_layers == 5
    assert cfg.model.d_model == yaml.safe_load(
        open(_preset_path("bert-tiny")).read())["model"]["d_model"]


def _preset_path(name):
    from llmjax.config import config_dirs
    for d in config_dirs():
        if (d / "models" / f"{name}.yaml").exists():
            return d / "models" / f"{name}.yaml"
    raise AssertionError(name)


def test_model_config_keyword_overrides():
    cfg = model_config("gpt-tiny", num_layers=3, num_kv_heads=1)
    assert (cfg.num_layers, cfg.kv_heads, cfg.num_heads) == (3, 1, 4)


def test_float_override_in_exponent_notation_is_a_float():
    # YAML 1.1 reads `1e-3` (no dot) as a string; the config accepts it as the float it means.
    cfg = load(None, ["model=gpt-tiny", "optimizer.learning_rate=1e-3"])
    assert cfg.optimizer.learning_rate == pytest.approx(1e-3)


def test_apply_override_builds_nested_sections():
    data = {}
    apply_override(data, "train.steps=3")
    apply_override(data, "model.num_layers=2")
    assert data == {"train": {"steps": 3}, "model": {"num_layers": 2}}


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_a_valid_config(name):
    cfg = from_dict({"model": name, "train": {"seq_len": 16}})
    assert cfg.model.family in {"gpt", "bert", "t5", "palm", "llama", "mixtral", "olmoe", "qwen3_moe"}


def test_yaml_file_missing_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------
# Errors name the key.

def test_heads_not_dividing_d_model_names_both_keys():
    msg = load_error("model.num_heads=5")  # gpt-tiny: d_model 64
    assert "model.num_heads" in msg and "model.d_model" in msg


def test_kv_heads_not_dividing_heads_names_the_key():
    msg = load_error("model.num_kv_heads=3")  # gpt-tiny: 4 heads
    assert "model.num_kv_heads" in msg and "model.num_heads" in msg


@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_kv_heads_is_an_error(value):
    assert "model.num_kv_heads" in load_error(f"model.num_kv_heads={value}")


def test_non_positive_head_dim_is_an_error():
    assert "model.head_dim" in load_error("model.head_dim=-4")


def test_unknown_key_names_it_and_suggests_the_closest():
    msg = load_error("model.num_layer=3")
    assert "model.num_layer" in msg and "did you mean 'num_layers'" in msg


def test_unknown_section_suggests_the_closest():
    msg = load_error("modle.num_layers=3")
    assert "modle" in msg and "did you mean 'model'" in msg


def test_unknown_key_in_yaml_file_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    msg = load_error(path=path)
    assert "train.stepz" in msg and "'steps'" in msg


def test_wrong_type_names_the_key():
    msg = load_error("model.d_model=abc")
    assert "model.d_model" in msg and "int" in msg


def test_float_for_int_key_is_an_error():
    assert "train.steps" in load_error("train.steps=1.5")


def test_wrong_type_for_bool_names_the_key():
    assert "model.scan_layers" in load_error("model.scan_layers=maybe")


def test_unknown_preset_names_it_and_suggests():
    with pytest.raises(ConfigError) as err:
        model_config("gpt2-smal")
    assert "gpt2-smal" in str(err.value) and "did you mean 'gpt2-small'" in str(err.value)


def test_unknown_preset_from_overrides():
    with pytest.raises(ConfigError, match="llama-tinyy"):
        load(None, ["model=llama-tinyy"])


@pytest.mark.parametrize("override, key", [
    ("model.norm=batchnorm", "model.norm"),
    ("model.remat=everything", "model.remat"),
    ("model.architecture=decoder_only", "model.architecture"),
    ("model.position=alibi", "model.position"),
])
def test_bad_choice_names_the_key_and_the_choices(override, key):
    msg = load_error(override)
    assert key in msg and "not one of" in msg


def test_bad_choice_suggests_the_closest():
    assert "did you mean 'rmsnorm'" in load_error("model.norm=rmsnrom")


def test_sequence_longer_than_learned_positions_names_both_keys():
    msg = load_error("train.seq_len=256")  # gpt-tiny: max_len 128
    assert "train.seq_len" in msg and "model.max_len" in msg


def test_encoder_heads_on_a_decoder_are_an_error():
    assert "model.architecture" in load_error("model.mlm_head=true")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        load(None, ["train.steps"])


def test_section_given_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="train"):
        load(None, ["train=5"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------
# Reading files (issue 13: one-line errors naming file, line and column).

def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: gpt-tiny\ntrain:\n  steps: 3\n   batch_size: 4\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4:") and "invalid YAML" in message
    assert "\n" not in message


def test_non_utf8_and_empty_config_files_are_config_errors(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"model: caf\xe9\n")
    (tmp_path / "empty.yaml").write_text("# only a comment\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 10\)"):
        load(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match="is empty"):
        load(tmp_path / "empty.yaml")


def test_override_keys_and_values_are_checked():
    with pytest.raises(ConfigError, match="not a dotted key"):
        apply_override({}, "train. steps=3")
    with pytest.raises(ConfigError, match="invalid YAML"):
        apply_override({}, "train.steps={1")


def test_home_in_data_and_run_paths_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load(None, ["model=gpt-tiny", "data.data_dir=~/tfds", "data.tokenizer=~/tok",
                      "train.run_dir=~/runs/x"])
    assert cfg.data.data_dir == str(tmp_path / "tfds")
    assert cfg.data.tokenizer == str(tmp_path / "tok")
    assert cfg.train.run_dir == str(tmp_path / "runs" / "x")
