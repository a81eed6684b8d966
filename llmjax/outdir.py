"""Where `llmjax convert`, PretrainedModel.save and save_params may write: a new or empty
directory, or (with --force / force=True) an earlier export of the same kind. A training
run's directory is never written into: its config.yaml describes its checkpoints, and
replacing it would orphan them."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from etils import epath

from llmjax import paths
from llmjax.config import ConfigError

# Files that only a training run has (llmjax/train/trainer.py, llmjax/checkpoint/).
RUN_MARKERS = ("checkpoints", "state", "metrics.jsonl", "metrics")
EXPORT_FILES = {
    "llmjax": ("config.yaml", "params", "tokenizer"),
    "hf": ("config.json", "generation_config.json", "model.safetensors",
           "model.safetensors.index.json", "model-*-of-*.safetensors", "tokenizer.json",
           "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
           "spiece.model", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
           "chat_template.jinja"),
}
KIND_NAMES = {"llmjax": "an llmjax export (config.yaml + params/)",
              "hf": "a Hugging Face directory (config.json)"}


def kind_of(directory: epath.Path) -> str | None:
    """'run', 'llmjax', 'hf' or None (something else) for an existing, non-empty directory."""
    if any((directory / m).exists() for m in RUN_MARKERS) or any(directory.glob("events.out.*")):
        return "run"
    if (directory / "config.yaml").exists() or (directory / "params").exists():
        return "llmjax"
    if (directory / "config.json").exists():
        return "hf"
    return None


def check_output_dir(out: paths.PathLike, kind: str, force: bool, action: str = "convert",
                     force_name: str = "--force") -> None:
    """ConfigError unless `out` may receive an export of `kind` ('llmjax' or 'hf'); the
    messages name the `action` and how to force it (the CLI's flag or the API's argument)."""
    out = paths.resolve(out, "output")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"output {out} is a file; give a directory path")
    if not any(out.iterdir()):
        return
    found = kind_of(out)
    if found == "run":
        raise ConfigError(f"output {out} is a training run directory (it has checkpoints or "
                          f"metrics); {action} into a new directory: a run's files are never "
                          f"overwritten, not even with {force_name}")
    if found != kind:
        what = KIND_NAMES.get(found, "a non-empty directory of other files")
        raise ConfigError(f"output {out} is {what}; {action} into a new or empty directory")
    if not force:
        raise ConfigError(f"output {out} already holds {KIND_NAMES[kind]}; pass {force_name} "
                          f"to replace it, or choose a new directory")


def remove_export(out: paths.PathLike, kind: str) -> None:
    """Delete the files of an earlier export of `kind` in `out` (after check_output_dir
    allowed it), so the new export never mixes with stale weights or tokenizer files."""
    out = paths.resolve(out, "output")
    if not out.is_dir() or kind_of(out) != kind:
        return
    for pattern in EXPORT_FILES[kind]:
        for path in out.glob(pattern):
            if path.is_dir() and not os.path.islink(os.fspath(path)):
                path.rmtree()  # epath: shutil.rmtree locally, every object under it remotely
            else:
                path.unlink()


@contextlib.contextmanager
def staged_export(out: str | os.PathLike, kind: str, force: bool, action: str = "convert",
                  force_name: str = "--force"):
    """Yields None for a local `out` (write it in place), or a local temporary directory for
    an export to object storage: the files written there replace the earlier export's in
    `out` when the block succeeds (libraries such as safetensors write local files only; a
    failed export never reaches the bucket and never removes the earlier one)."""
    if not paths.is_remote(paths.check(out, "output")):
        yield None
        return
    check_output_dir(out, kind, force, action, force_name)
    staging = tempfile.mkdtemp(prefix="llmjax-export-")
    try:
        yield os.path.join(staging, "export")
        remove_export(out, kind)
        paths.upload(os.path.join(staging, "export"), out, "output")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
