"""Checks that run before a model is built or anything compiles: the tokenizer fits the
model's vocabulary, the data paths hold data, init_from exists, the run directory is writable.

Token ids >= model.vocab_size are not an error inside XLA: the embedding gather clamps
them and the loss goes NaN, so a too-large tokenizer must be caught here.

Experiment YAMLs name the commands that create their inputs in their header comments
(`#   python -m llmjax.data.labelled .cache/llmjax`, `#   llmjax train ...base.yaml`). Given
the config's path (the CLI passes it), a missing input's error quotes those steps, which are
the right fix, instead of a generic one.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Optional

from llmjax import paths
from llmjax.checkpoint import describe_os_error
from llmjax.config import Config, ConfigError
from llmjax.data.tokenizer import load_tokenizer
from llmjax.errors import MissingInputError

_STEP = re.compile(r"^#\s*((?:llmjax|python -m llmjax|tpu/)\S*\s.*?)\s*(?:#.*)?$")


def setup_steps(config_path: Optional[str | os.PathLike]) -> list[str]:
    """Commands named in the leading comment block of a config file."""
    if not config_path or not Path(config_path).is_file():
        return []
    steps = []
    for line in Path(config_path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        match = _STEP.match(line.strip())
        if match:
            steps.append(match.group(1))
    return steps


def setup_hint(config_path: Optional[str | os.PathLike]) -> str:
    """'; this config's setup steps: ...' (the steps before the one that runs this config)."""
    steps = setup_steps(config_path)
    own = Path(config_path).name if config_path else None
    before = [s for s in steps if not own or own not in s] or steps
    return "; this config's setup steps: " + "; ".join(f"`{s}`" for s in before) if before else ""


def check_inputs(cfg: Config, config_path: Optional[str | os.PathLike] = None) -> None:
    """Tokenizer vs model vocabulary, the data files and init_from (ConfigError naming the key
    and the fix)."""
    hint = setup_hint(config_path)
    for key, value in (("train.run_dir", cfg.train.run_dir), ("train.init_from", cfg.train.init_from),
                       ("data.data_dir", cfg.data.data_dir), ("data.tokenizer", cfg.data.tokenizer)):
        if value:
            paths.check(value, key)  # `gs:/b`, `gcs://b`: one line naming the fix
    _check_tokenizer(cfg, hint)
    data = cfg.data
    if data.source == "text":
        for key in ("paths", "validation_paths"):
            for pattern in getattr(data, key):
                files = paths.glob(pattern, f"data.{key}")
                if not files:
                    raise MissingInputError(f"data.{key}: {pattern!r} matches no file: fix the glob "
                                      f"or create the files{hint}")
                if key == "paths" and not any(paths.signature(p)[0] for p in files):
                    raise ConfigError(f"data.{key}: every file {pattern!r} matches is empty: "
                                      f"point it at text to train on")
    elif data.source == "tfds" and _local(data.data_dir):
        path = Path(data.data_dir).expanduser()
        if not path.is_dir():
            raise MissingInputError(f"data.data_dir={data.data_dir!r} does not exist"
                              + (hint or ": set it to the directory holding the prepared "
                                         "dataset (`llmjax data prepare`, docs/data.md)"))
        if not any(path.iterdir()):
            raise ConfigError(f"data.data_dir={data.data_dir!r} is empty: prepare the dataset "
                              f"there first (`llmjax data prepare` or `tfds build`){hint}")
    _check_eval_tasks(cfg)
    init_from = cfg.train.init_from
    # A run that resumes reads init_from only to find a moved PEFT base (checked there).
    if init_from and _local(init_from) and not Path(init_from).expanduser().exists() and \
            not _has_checkpoints(cfg.train.run_dir):
        raise MissingInputError(f"train.init_from={init_from!r} does not exist" + (
            hint or "; train the base model first, or point init_from at a run directory, "
                    "checkpoint or parameter export"))


def _check_tokenizer(cfg: Config, hint: str) -> None:
    tok_dir = cfg.data.tokenizer
    if not tok_dir:
        return
    if _local(tok_dir) and not Path(tok_dir).expanduser().exists():
        raise MissingInputError(f"data.tokenizer={tok_dir!r} does not exist" + (
            hint or f": create it with `llmjax tokenizer train --input FILES --vocab-size N "
                    f"--out {tok_dir}` or point data.tokenizer at its directory"))
    try:
        tok = load_tokenizer(tok_dir)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"data.tokenizer={tok_dir!r} cannot be loaded: {err}") from None
    model_vocab = cfg.model.vocab_size
    vocab = int(tok.vocab_size)
    special = tok.special_ids
    roles = ("pad", "unk", "bos", "eos", "mask", "cls", "sep")
    top = max([int(special[r]) for r in roles] + [special.num_special - 1])
    if vocab > model_vocab or top >= model_vocab:
        raise ConfigError(
            f"data.tokenizer={tok_dir!r} has {vocab} tokens (largest special id {top}) but "
            f"model.vocab_size={model_vocab}: ids >= {model_vocab} have no embedding row "
            f"(they would be clamped and train to NaN); set model.vocab_size={vocab} or "
            f"more, or use a tokenizer with at most {model_vocab} tokens")


def _has_checkpoints(run_dir: str) -> bool:
    directory = Path(run_dir).expanduser() / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _local(path: str) -> bool:
    """Remote URLs (gs://...) are checked where they are opened, not here."""
    return not paths.is_remote(path)


def check_writable(run_dir: Path) -> None:
    """Create run_dir and write/remove a probe file in it, else a one-line ConfigError."""
    probe = run_dir / f".llmjax-write-test-{uuid.uuid4().hex[:8]}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train.run_dir={str(run_dir)!r} is not writable: "
                          f"{describe_os_error(err)}; choose another train.run_dir or fix its "
                          f"permissions/space") from None


def _check_eval_tasks(cfg: Config) -> None:
    """eval.tasks: each a bundled task or a task YAML whose data files exist; text tasks need
    the run's tokenizer."""
    if not cfg.eval.tasks:
        return
    from llmjax.evaluation.task_files import load_task

    if not cfg.data.tokenizer:
        raise ConfigError("eval.tasks are text: set data.tokenizer (the run's tokenizer) or "
                          "eval.tasks=[]")
    for spec in cfg.eval.tasks:
        try:
            load_task(spec, registry=False)
        except ConfigError as err:
            raise type(err)(f"eval.tasks: {err}") from None
