"""JAX's persistent compilation cache: repeated runs skip XLA compiles (seconds each)."""
from __future__ import annotations

import os
from pathlib import Path

import jax


def enable(directory: str | os.PathLike) -> Path:
    """Cache every compiled executable under `directory` (created if missing)."""
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def enable_from_config(config) -> None:
    """On unless train.compilation_cache is empty."""
    if config.train.compilation_cache:
        enable(config.train.compilation_cache)
