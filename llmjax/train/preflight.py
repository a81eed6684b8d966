"""Checks that run before a model is built or anything compiles: the tokenizer fits the
model's vocabulary, the data paths hold data, and the run directory is writable.

Token ids >= model.vocab_size are not an error inside XLA: the embedding gather clamps
them and the loss goes NaN, so a too-large tokenizer must be caught here.
"""
from __future__ import annotations

import glob
import os
import uuid
from pathlib import Path

from llmjax.checkpoint import describe_os_error
from llmjax.config import Config, ConfigError


def check_inputs(cfg: Config) -> None:
    """Tokenizer vs model vocabulary, then the data files (ConfigError naming the key)."""
    model_vocab = cfg.model.vocab_size
    tok_dir = cfg.data.tokenizer
    if tok_dir:
        from llmjax.data.tokenizer import load_tokenizer
        if not Path(tok_dir).expanduser().exists():
            raise ConfigError(f"data.tokenizer={tok_dir!r} does not exist: train one with "
                              f"`llmjax tokenizer train` or point data.tokenizer at its directory")
        try:
            tok = load_tokenizer(tok_dir)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"data.tokenizer={tok_dir!r} cannot be loaded: {err}") from None
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
    data = cfg.data
    if data.source == "text":
        for key in ("paths", "validation_paths"):
            for pattern in getattr(data, key):
                files = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                         if os.path.isfile(p)]
                if not files:
                    raise ConfigError(f"data.{key}: {pattern!r} matches no file: fix the glob "
                                      f"or create the files")
                if key == "paths" and not any(os.path.getsize(p) for p in files):
                    raise ConfigError(f"data.{key}: every file {pattern!r} matches is empty: "
                                      f"point it at text to train on")
    elif data.source == "tfds" and "://" not in data.data_dir:
        path = Path(data.data_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"data.data_dir={data.data_dir!r} does not exist: set it to the "
                              f"directory holding the prepared dataset (`llmjax data prepare`)")
        if not any(path.iterdir()):
            raise ConfigError(f"data.data_dir={data.data_dir!r} is empty: prepare the dataset "
                              f"there first (`llmjax data prepare` or `tfds build`)")


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
