"""Checks a config's input paths before anything is built, quoting the config's own setup steps.

Experiment YAMLs name the commands that create their inputs in their header comments
(`#   python -m llmjax.data.labelled .cache/llmjax`, `#   llmjax train ...base.yaml`). When a
tokenizer, dataset directory or init_from checkpoint is missing, the error quotes those steps,
which are the right fix, instead of a generic "train a tokenizer".
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from llmjax.errors import ConfigError

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


def check_inputs(cfg, config_path: Optional[str | os.PathLike] = None) -> None:
    """ConfigError for a missing local tokenizer, text file, TFDS data_dir or init_from path,
    or a tokenizer larger than model.vocab_size."""
    steps = setup_steps(config_path)
    # The steps before the one that runs this config are the ones that create its inputs.
    own = Path(config_path).name if config_path else None
    before = [s for s in steps if not own or own not in s] or steps
    hint = "; this config's setup steps: " + "; ".join(f"`{s}`" for s in before) if before else ""
    data = cfg.data
    if data.tokenizer and _missing(data.tokenizer):
        fix = hint or (f"; create it with `llmjax tokenizer train --input FILES --vocab-size N "
                       f"--out {data.tokenizer}`")
        raise ConfigError(f"data.tokenizer={data.tokenizer!r} does not exist{fix}")
    if data.tokenizer:
        _check_vocab(cfg, data.tokenizer)
    if data.source == "text":  # every glob must match a file
        from llmjax.data.sources import expand_globs
        expand_globs(data.paths, "data.paths")
        expand_globs(data.validation_paths, "data.validation_paths")
    if data.source == "tfds" and data.data_dir and _missing(data.data_dir):
        fix = hint or "; prepare the dataset there first (docs/data.md)"
        raise ConfigError(f"data.data_dir={data.data_dir!r} does not exist{fix}")
    init_from = cfg.train.init_from
    if init_from and _missing(init_from):
        fix = hint or ("; train the base model first, or point init_from at a run directory, "
                       "checkpoint or parameter export")
        raise ConfigError(f"train.init_from={init_from!r} does not exist{fix}")


def _check_vocab(cfg, tokenizer_dir: str) -> None:
    """Token ids must fit the embedding: an id past model.vocab_size is silently clamped by
    the lookup and breaks decoding."""
    from llmjax.data.tokenizer import load_tokenizer
    size = load_tokenizer(tokenizer_dir).vocab_size
    if size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({size} ids in {tokenizer_dir}): set model.vocab_size={size}")


def _missing(path: str) -> bool:
    """A local path that does not exist (remote URLs such as gs:// are not checked here)."""
    return "://" not in path and not Path(path).expanduser().exists()
