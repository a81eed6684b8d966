"""Parameter exports: a directory with `config.yaml` (the model section, and optionally the
rest of the run config) and `params/` (an orbax PyTree checkpoint of the plain parameter
dict), plus `tokenizer/` when known. What `init_from`, `llmjax convert`, `llmjax export` and
`llmjax.from_pretrained` read and write.

`write_params_export` writes beside OUT and renames into place, so a failure leaves OUT as it
was; a non-empty OUT that is not an export is never replaced, an earlier export only with force.
"""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
import yaml
from etils import epath
from jax.experimental import multihost_utils

from llmjax import paths
from llmjax.checkpoint.location import CHECKPOINT_DIR, PathLike
from llmjax.config import Config, ConfigError, ModelConfig
from llmjax.errors import CheckpointError

TOKENIZER_SUBDIR = "tokenizer"


def _config_dict(config: Config | ModelConfig | dict) -> dict:
    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, ModelConfig):
        return {"model": dataclasses.asdict(config)}
    return dict(config)


def save_params(directory: PathLike, params: Any, config: Config | ModelConfig | dict,
                extra: Optional[dict] = None, force: bool = False) -> epath.Path:
    """Write params (sharded or not) and the config; returns the directory.

    `directory` must be new or empty; `force=True` replaces an earlier parameter export there
    (its files are removed first). A training run directory or a directory of other files
    is refused: its config.yaml or files are never overwritten."""
    from llmjax.outdir import check_output_dir, remove_export

    directory = paths.absolute(directory, "output")
    check_output_dir(directory, "llmjax", force, action="save", force_name="force=True")
    if jax.process_count() > 1:  # every process checked before any writes
        multihost_utils.sync_global_devices("llmjax save_params: output checked")
    if jax.process_index() == 0:
        remove_export(directory, "llmjax")  # no stale tokenizer/ or params/ beside the new
    directory.mkdir(parents=True, exist_ok=True)
    data = _config_dict(config)
    if extra:
        data.update(extra)
    if jax.process_index() == 0:
        (directory / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params, force=True)
        checkpointer.wait_until_finished()
    return directory


def read_config(directory: PathLike) -> dict:
    """The config dict stored beside a parameter export or a run's checkpoints."""
    path = paths.absolute(directory) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{str(directory)!r} has no config.yaml: not an llmjax checkpoint "
                          f"(convert HF/GGUF models with `llmjax convert`)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: not valid YAML: "
                              f"{' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):  # a list or scalar: not a config llmjax wrote
        raise CheckpointError(f"{path}: expected a YAML mapping of config sections, got "
                              f"{type(data).__name__}")
    return data


def load_params(directory: PathLike, target: Any = None) -> tuple[Any, dict]:
    """(params, config dict) of a parameter export.

    `target` is a tree of jax.ShapeDtypeStruct (with shardings) to restore onto
    a given mesh layout; without it, arrays come back on the default device.
    """
    directory = paths.absolute(directory)
    config = read_config(directory)
    path = directory / "params"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} is missing: the parameter export is incomplete")
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            meta = checkpointer.metadata(path)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=single), tree)
        params = checkpointer.restore(path, target)
    return params, config


# ---------------------------------------------------------------- whole exports, atomically

def is_export(path: PathLike) -> bool:
    """A parameter or adapter export (config.yaml + params/), not a run directory."""
    path = paths.absolute(path)
    return ((path / "config.yaml").is_file() and (path / "params").is_dir()
            and not (path / CHECKPOINT_DIR).exists())


def staging_dir(out: epath.Path, force: bool) -> epath.Path:
    """A fresh directory beside OUT to write into (checks OUT may be replaced)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is a file: choose another OUT")
    if out.is_dir() and any(True for _ in out.iterdir()):
        if not is_export(out):
            raise CheckpointError(f"{out} is not empty and not an llmjax export: choose an "
                                  f"empty or new OUT (nothing there is overwritten)")
        if not force:
            raise CheckpointError(f"{out} already holds an export: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.export-{uuid.uuid4().hex[:12]}"


def commit_staged(staging: epath.Path, out: epath.Path) -> epath.Path:
    """Swap the finished export into OUT (the old one is removed only afterwards)."""
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    if out.exists():
        paths.move(out, old)  # object storage: copy, then delete (no rename there)
    paths.move(staging, out)
    if old.exists():
        old.rmtree()
    return out


def remove_staged(staging: epath.Path) -> None:
    if staging.exists():
        staging.rmtree()


def copy_tokenizer(src: Optional[PathLike], out: PathLike) -> bool:
    """Copy the files of a tokenizer directory (llmjax sentencepiece or HF) into out/tokenizer,
    where from_pretrained looks; False when there is none to copy."""
    if src is None or not paths.absolute(src, "tokenizer").is_dir():
        return False
    dst = paths.absolute(out, "output") / TOKENIZER_SUBDIR
    dst.mkdir(parents=True, exist_ok=True)
    for f in paths.absolute(src, "tokenizer").iterdir():
        if f.is_file():
            f.copy(dst / f.name, overwrite=True)
    return True


def write_params_export(out: PathLike, params: Any, model_cfg: ModelConfig,
                        tokenizer: Optional[PathLike] = None, force: bool = False,
                        extra: Optional[dict] = None) -> epath.Path:
    """A parameter export (config.yaml with the model section, params/, tokenizer/)."""
    out = paths.absolute(out, "output")
    staging = staging_dir(out, force)
    try:
        save_params(staging, params, model_cfg, extra=extra)
        copy_tokenizer(tokenizer, staging)
    except BaseException:
        remove_staged(staging)
        raise
    return commit_staged(staging, out)
