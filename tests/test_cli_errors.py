"""The `llmjax` error convention: one `llmjax: error: ...` line on stderr, exit 2 for input the
user can fix, no traceback (unless --debug / LLMJAX_DEBUG=1), exit 1 for bugs, 130 for Ctrl-C.

Every row of BAD_INPUTS fails before a model is built, so the table costs well under a second
per row (in-process through cli.main)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmjax import cli

ROOT = Path(__file__).resolve().parents[1]
GPT = str(ROOT / "configs" / "experiments" / "gpt-tiny.yaml")
LORA = str(ROOT / "configs" / "experiments" / "peft-lora.yaml")
CLASSIFY = str(ROOT / "configs" / "experiments" / "finetune-bert-classify.yaml")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A directory of bad (and a few good) inputs; rows refer to them by name."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "unclosed.yaml").write_text("model: gpt-tiny\ntrain: {steps: 3\n")
    (d / "tabs.yaml").write_text("model: gpt-tiny\ntrain:\n\tsteps: 3\n")
    (d / "latin1.yaml").write_bytes("model: gpt-tiny  # caf\xe9\n".encode("latin-1"))
    (d / "binary.yaml").write_bytes(bytes(range(256)))
    (d / "nul.yaml").write_text("model: gpt\x00tiny\n")
    (d / "empty.yaml").write_text("")
    (d / "comments.yaml").write_text("# nothing but a comment\n")
    (d / "list.yaml").write_text("- model\n- train\n")
    (d / "section.yaml").write_text("model: gpt-tiny\ntrain: 5\n")
    (d / "adir.yaml").mkdir()
    (d / "hf-bad").mkdir()
    (d / "hf-bad" / "config.json").write_text("{model_type: gpt2")
    (d / "twice.yaml").write_text("model: gpt-tiny\ntrain: {steps: 3}\ntrain: {batch_size: 4}\n")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("  \n\n\t\n")
    (d / "small.txt").write_text("the cat sat on the mat\n" * 3)
    from llmjax.data.tokenizer import train_sentencepiece
    text = d / "text.txt"
    text.write_text("".join(f"line {i} of a small corpus, words and more words\n" for i in range(300)))
    tokenizer = train_sentencepiece([text], d / "tok", vocab_size=400)
    _export(d / "gpt-export", "gpt-tiny", tokenizer)  # for the generate rows
    _export(d / "bert-export", "bert-tiny", tokenizer)
    return d


def _export(directory, preset, tokenizer):
    """A tiny llmjax parameter export with a tokenizer (what `llmjax generate` loads)."""
    import shutil

    import jax
    from llmjax.config import model_config
    from llmjax.models.api import init_params
    from llmjax.pretrained import TOKENIZER_SUBDIR, PretrainedModel
    cfg = model_config(preset)
    PretrainedModel(cfg, init_params(cfg, jax.random.key(0)), tokenizer, None).save(directory)
    # save() copies Hugging Face tokenizer files only; an llmjax tokenizer goes in by hand.
    shutil.copytree(Path(tokenizer.model_file).parent, directory / TOKENIZER_SUBDIR,
                    dirs_exist_ok=True)


# (name, argv with {d} = the inputs directory, a fragment the message must contain)
BAD_INPUTS = [
    # configs: files
    ("yaml syntax", ["train", "{d}/unclosed.yaml"], "unclosed.yaml:3:1: invalid YAML"),
    ("yaml tab", ["train", "{d}/tabs.yaml"], "tabs.yaml:3:1: invalid YAML"),
    ("latin-1 config", ["train", "{d}/latin1.yaml"], "is not UTF-8 text"),
    ("binary config", ["train", "{d}/binary.yaml"], "is not UTF-8 text"),
    ("NUL in config", ["train", "{d}/nul.yaml"], "invalid YAML"),
    ("empty config", ["train", "{d}/empty.yaml"], "is empty"),
    ("comment-only config", ["eval", "{d}/comments.yaml"], "is empty"),
    ("list config", ["train", "{d}/list.yaml"], "must hold a mapping"),
    ("section not a mapping", ["train", "{d}/section.yaml"], "train must be a mapping"),
    ("missing config", ["train", "{d}/nowhere.yaml"], "does not exist"),
    ("config name only", ["train", "gpt-tiny.yaml"], "did you mean"),
    ("config is a directory", ["plan", "{d}/adir.yaml"], "is a directory"),
    ("duplicate section", ["train", "{d}/twice.yaml"], "twice.yaml:3:1: invalid YAML: duplicate key"),
    # configs: keys, values, overrides
    ("unknown key", ["train", GPT, "model.num_layer=3"], "did you mean 'num_layers'"),
    ("unknown section", ["train", GPT, "trian.steps=3"], "unknown key 'trian'"),
    ("override without =", ["train", GPT, "train.steps"], "section.key=value"),
    ("override bad key", ["train", GPT, "train..steps=3"], "not a dotted key"),
    ("override bad yaml", ["train", GPT, "train.steps=[1"], "invalid YAML"),
    ("wrong type", ["train", GPT, "train.steps=many"], "train.steps expects int"),
    ("fractional count", ["train", GPT, "train.steps=2.5"], "train.steps expects int, got 2.5"),
    ("zero steps", ["train", GPT, "train.steps=0"], "train.steps=0 must be positive"),
    ("negative batch", ["train", GPT, "train.batch_size=-4"], "must be positive"),
    ("zero d_model", ["plan", GPT, "model.d_model=0"], "model.d_model=0 must be positive"),
    ("heads do not divide", ["train", GPT, "model.num_heads=3"], "does not divide"),
    ("negative lr", ["train", GPT, "optimizer.learning_rate=-1"], "must be positive"),
    ("zero mesh axis", ["train", GPT, "mesh.fsdp=0"], "mesh.fsdp=0"),
    ("unknown preset", ["train", GPT, "model=gpt-tyni"], "did you mean 'gpt-tiny'"),
    ("seq_len > max_len", ["train", GPT, "train.seq_len=100000"], "exceeds model.max_len"),
    ("rate out of range", ["train", GPT, "objective.mask_rate=2"], "must be in (0, 1)"),
    ("unknown data source", ["train", GPT, "data.source=csvv"], "data.source"),
    ("text source without paths", ["train", GPT, "data.source=text"], "data.paths is empty"),
    ("unknown optimizer", ["train", GPT, "optimizer.name=adamww"], "optimizer.name"),
    ("finetune without init_from", ["finetune", GPT], "finetune needs init_from"),
    ("init_from missing", ["finetune", LORA, "init_from={d}/no-run"], "llmjax train"),
    ("tokenizer missing", ["train", GPT, "data.tokenizer={d}/no-tok"], "data.tokenizer"),
    ("tokenizer bigger than model", ["train", GPT, "data.tokenizer={d}/tok", "model.vocab_size=380"],
     "has 400 tokens (largest special id"),
    ("classify data step", ["finetune", CLASSIFY, "data.tokenizer={d}/no-tok"],
     "python -m llmjax.data.labelled"),
    # global options and command names
    ("negative cpu devices", ["--cpu-devices", "-1", "models"], "--cpu-devices"),
    ("zero cpu devices", ["--cpu-devices", "0", "models"], "positive number of devices"),
    ("cpu devices not a number", ["models", "--cpu-devices", "x"], "positive number"),
    ("misspelt command", ["trian", GPT], "did you mean 'train'"),
    ("no command", [], "required: COMMAND"),
    ("no config", ["train"], "required: config"),
    ("unknown option", ["models", "--fast"], "unrecognized arguments: --fast"),
    ("demo steps not a number", ["demo", "--steps", "many"], "--steps"),
    ("demo zero steps", ["demo", "--steps", "0"], "--steps"),
    # tokenizer train / data prepare
    ("tokenizer input missing", ["tokenizer", "train", "--input", "{d}/none.txt",
                                 "--vocab-size", "1000", "--out", "{d}/t1"], "none.txt"),
    ("tokenizer input empty", ["tokenizer", "train", "--input", "{d}/empty.txt", "{d}/blank.txt",
                               "--vocab-size", "1000", "--out", "{d}/t2"], "empty or blank"),
    ("vocab too small", ["tokenizer", "train", "--input", "{d}/text.txt", "--vocab-size", "100",
                         "--out", "{d}/t3"], "at least 364"),
    ("vocab too big for corpus", ["tokenizer", "train", "--input", "{d}/text.txt",
                                  "--vocab-size", "50000", "--out", "{d}/t4"], "or less, or train on more text"),
    ("corpus too small", ["tokenizer", "train", "--input", "{d}/small.txt",
                          "--vocab-size", "1000", "--out", "{d}/t5"], "yields at most"),
    ("bad model type", ["tokenizer", "train", "--input", "{d}/text.txt", "--vocab-size", "1000",
                        "--model-type", "word", "--out", "{d}/t6"], "invalid choice: 'word'"),
    ("character coverage", ["tokenizer", "train", "--input", "{d}/text.txt", "--vocab-size", "400",
                            "--character-coverage", "0.5", "--out", "{d}/t7"], "[0.98, 1]"),
    ("train glob matches nothing", ["train", GPT, "data.source=text", "data.paths=[{d}/no/*.txt]",
                                    "data.data_dir={d}/dd", "data.tokenizer={d}/tok"],
     "matches no file"),
    ("prepare seq-len", ["data", "prepare", "--paths", "{d}/text.txt", "--data-dir", "{d}/dd",
                         "--tokenizer", "{d}/tok", "--seq-len", "0"], "--seq-len 0"),
    ("glob matches nothing", ["data", "prepare", "--paths", "{d}/none/*.txt", "--data-dir",
                              "{d}/dd", "--tokenizer", "{d}/tok"], "matches no file"),
    ("prepare empty files", ["data", "prepare", "--paths", "{d}/empty.txt", "{d}/blank.txt",
                             "--data-dir", "{d}/dd", "--tokenizer", "{d}/tok"], "empty or blank"),
    ("prepare tokenizer missing", ["data", "prepare", "--paths", "{d}/text.txt", "--data-dir",
                                   "{d}/dd", "--tokenizer", "{d}/no-tok"], "does not exist"),
    ("prepare bad fraction", ["data", "prepare", "--paths", "{d}/text.txt", "--data-dir",
                              "{d}/dd", "--tokenizer", "{d}/tok", "--validation-fraction", "1.5"],
     "validation_fraction"),
    ("unknown corpus", ["data", "corpus", "tolstoy", "--cache", "{d}/c"], "invalid choice"),
    # other commands
    ("convert not an HF dir", ["convert", "hf-to-llmjax", "{d}/nowhere", "{d}/out"],
     "no config.json"),
    ("convert bad config.json", ["convert", "hf-to-llmjax", "{d}/hf-bad", "{d}/out"],
     "hf-bad/config.json: not valid JSON"),
    ("convert not gguf", ["convert", "gguf-to-llmjax", "{d}/small.txt", "{d}/out"], ".gguf"),
    ("generate unknown model", ["generate", "{d}/nowhere", "--prompt", "hi"], "nowhere"),
    ("generate past max_len", ["generate", "{d}/gpt-export", "--prompt", "hi",
                               "--max-new-tokens", "100000"], "exceeds model.max_len"),
    ("generate from an encoder", ["generate", "{d}/bert-export", "--prompt", "hi"],
     "encoder-only"),
    ("peft summary bad yaml", ["peft", "summary", "{d}/unclosed.yaml"], "unclosed.yaml:3:1"),
    ("plot not a run", ["plot", "{d}"], "has no metrics.jsonl"),
]


@pytest.mark.parametrize("name,argv,fragment", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(inputs, capsys, monkeypatch, name, argv, fragment):
    monkeypatch.delenv("LLMJAX_DEBUG", raising=False)
    monkeypatch.chdir(inputs)  # relative paths in configs resolve to nothing here
    code = cli.main([a.replace("{d}", str(inputs)) for a in argv])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("llmjax: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


def test_table_is_broad():
    assert len(BAD_INPUTS) >= 30
    assert len({tuple(argv[:1]) for _, argv, _ in BAD_INPUTS}) >= 8  # across subcommands


def _fail_with(exc):
    def handler(args):
        raise exc
    return handler


def test_a_bug_is_an_internal_error_with_exit_1(monkeypatch, capsys):
    monkeypatch.delenv("LLMJAX_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_models", _fail_with(KeyError("oops")))
    assert cli.main(["models"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("llmjax: error: internal error: KeyError: 'oops'")
    assert "--debug" in line


def test_a_library_value_error_is_a_bug_but_ours_is_a_user_error(monkeypatch, capsys):
    monkeypatch.delenv("LLMJAX_DEBUG", raising=False)
    import numpy as np
    monkeypatch.setattr(cli, "cmd_models", lambda args: np.zeros(3).reshape(2))
    assert cli.main(["models"]) == 1  # raised inside numpy: internal
    assert "internal error: ValueError" in capsys.readouterr().err
    from llmjax.data.tokenizer import SpecialTokens
    monkeypatch.setattr(cli, "cmd_models", lambda args: SpecialTokens().sentinel(1000))
    assert cli.main(["models"]) == 2  # raised by llmjax's own check: a message for the user
    assert "sentinel index 1000 out of range" in capsys.readouterr().err


def test_a_missing_optional_package_names_the_install_command(monkeypatch, capsys):
    monkeypatch.delenv("LLMJAX_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_models", lambda args: importlib.import_module("gguf_nope"))
    assert cli.main(["models"]) == 2
    assert "'gguf_nope', which is not installed: pip install gguf_nope" in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_models", _fail_with(ModuleNotFoundError("x", name="torch")))
    assert cli.main(["models"]) == 2
    assert "pip install -e '.[hf]'" in capsys.readouterr().err


def test_debug_flag_and_environment_variable_show_the_traceback(monkeypatch):
    monkeypatch.setattr(cli, "cmd_models", _fail_with(KeyError("oops")))
    with pytest.raises(KeyError):
        cli.main(["--debug", "models"])
    with pytest.raises(KeyError):
        cli.main(["models", "--debug"])
    monkeypatch.setenv("LLMJAX_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["models"])


def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys):
    monkeypatch.delenv("LLMJAX_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_models", _fail_with(KeyboardInterrupt()))
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err.strip() == "llmjax: error: interrupted"


def test_real_process_prints_one_line_and_no_third_party_noise(inputs):
    """A subprocess: what the terminal really gets (interpreter start, imports, logging)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    env.pop("LLMJAX_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "llmjax", "train", str(inputs / "unclosed.yaml")],
                          capture_output=True, text=True, env=env, cwd=inputs, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"llmjax: error: {inputs / 'unclosed.yaml'}:3:1: invalid YAML: expected ',' or '}}', but "
        f"got '<stream end>' (parsing a flow mapping started at line 2, column 8)"]
    assert proc.stdout == ""


def test_third_party_notices_stay_out_of_the_terminal(inputs, tmp_path):
    """TFDS prints "Downloading and preparing ..." / "... downloaded and prepared" and draws
    bars while it builds a dataset; the user sees llmjax's own lines only (-v shows the rest)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    argv = [sys.executable, "-m", "llmjax", "data", "prepare", "--paths", str(inputs / "text.txt"),
            str(inputs / "small.txt"), "--data-dir", str(tmp_path / "data"),
            "--tokenizer", str(inputs / "tok")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dataset: ") and "\ntrain: 2 files" in proc.stdout
    both = proc.stdout + proc.stderr
    for noise in ("Downloading and preparing", "downloaded and prepared", "Generating ",
                  "absl", "tensorflow_datasets", "Traceback"):
        assert noise not in both, both


@pytest.mark.parametrize("code", [75, 130])
def test_demo_stopped_by_a_signal_returns_the_run_exit_code(tmp_path, monkeypatch, capsys, code):
    """A demo run stopped by SIGTERM / Ctrl-C has no final evaluation: the demo reports where
    it stopped and exits with the run's code (no crash on missing eval metrics, no sample).
    Corpus, tokenizer and training are stand-ins: this is demo.py's own control flow."""
    import llmjax.compile_cache
    import llmjax.console
    import llmjax.data.corpus
    import llmjax.data.tokenizer
    import llmjax.train.trainer as trainer

    text = tmp_path / "play.txt"
    text.write_text("ROMEO.\nWherefore art thou.\n")
    monkeypatch.setattr(llmjax.data.corpus, "shakespeare", lambda cache: ([text], [text]))
    monkeypatch.setattr(llmjax.data.tokenizer, "train_sentencepiece", lambda *a, **k: object())
    monkeypatch.setattr(llmjax.compile_cache, "enable", lambda path: None)
    monkeypatch.setattr(llmjax.console, "quiet_tfds", lambda: None)
    monkeypatch.setattr(trainer, "train", lambda cfg: trainer.RunResult(
        None, 3, {"loss": 5.0}, {}, Path(cfg.train.run_dir), exit_code=code, checkpoint_step=3))
    assert cli.main(["demo", "--cache", str(tmp_path / "cache"), "--steps", "10"]) == code
    out = capsys.readouterr().out
    assert f"stopped at step 3 (checkpoint of step 3 in {tmp_path / 'cache'}" in out
    assert "validation loss" not in out and "sample" not in out
