"""Checkpoints on orbax: exported parameter directories (params + config).

A parameter export is a directory with `config.yaml` (the model section, and
optionally the rest of the run config) and `params/` (an orbax PyTree
checkpoint of the plain parameter dict). It is what `init_from`,
`llmjax convert` and `llmjax.from_pretrained` read and write.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
import yaml

from llmjax.config import Config, ConfigError, ModelConfig


def _config_dict(config: Config | ModelConfig | dict) -> dict:
    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, ModelConfig):
        return {"model": dataclasses.asdict(config)}
    return dict(config)


def save_params(directory: str | os.PathLike, params: Any,
                config: Config | ModelConfig | dict, extra: Optional[dict] = None) -> Path:
    """Write params (sharded or not) and the config; returns the directory."""
    directory = Path(directory).absolute()
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


def read_config(directory: str | os.PathLike) -> dict:
    """The config dict stored beside a parameter export or a run's checkpoints."""
    path = Path(directory) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{str(directory)!r} has no config.yaml: not an llmjax checkpoint "
                          f"(convert HF/GGUF models with `llmjax convert`)")
    return yaml.safe_load(path.read_text()) or {}


def load_params(directory: str | os.PathLike, target: Any = None) -> tuple[Any, dict]:
    """(params, config dict) of a parameter export.

    `target` is a tree of jax.ShapeDtypeStruct (with shardings) to restore onto
    a given mesh layout; without it, arrays come back on the default device.
    """
    directory = Path(directory).absolute()
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
