"""The meta item of a train checkpoint (checkpoints/<step>/meta/metadata, JSON): the resolved
config, the tokenizer's path and hash, mesh and process count, the PRNG implementation, eval
metrics and a PEFT run's base reference; and the checks a resume makes against it."""
from __future__ import annotations

import json
import time
from typing import Any, Optional

import jax

from llmjax import paths
from llmjax.config import Config, ModelConfig
from llmjax.errors import CheckpointError

FORMAT_VERSION = 1


def rng_impl_name() -> str:
    return str(jax.random.key_impl(jax.random.key(0)))


def tokenizer_reference(config: Config) -> Optional[dict]:
    """{path, model_sha256} of the run's tokenizer (None without one)."""
    directory = config.data.tokenizer
    if not directory:
        return None
    ref: dict = {"path": str(paths.absolute(directory, "data.tokenizer"))}
    meta = paths.absolute(directory, "data.tokenizer") / "llmjax_tokenizer.json"
    if meta.exists():
        data = json.loads(meta.read_text())
        ref["model_sha256"] = data.get("model_sha256")
        ref["vocab_size"] = data.get("vocab_size")
    return ref


def build_meta(config: Config, step: int, mesh=None, eval_metrics: Optional[dict] = None,
               base: Any = None) -> dict:
    """The meta item of checkpoint `step` (`base`: a BaseRef-like object with to_dict())."""
    meta = {"format": FORMAT_VERSION, "step": int(step), "time": time.time(),
            "config": config.to_dict(), "tokenizer": tokenizer_reference(config),
            "process_count": jax.process_count(), "device_count": jax.device_count(),
            "mesh": dict(mesh.shape) if mesh is not None else None,
            "rng_impl": rng_impl_name(),
            "eval": {k: float(v) for k, v in (eval_metrics or {}).items()}}
    if base is not None:
        meta["base"] = base.to_dict()
    return meta


def check_tokenizer(saved: Optional[dict], config: Config, where: str) -> None:
    now = tokenizer_reference(config)
    if not saved or not now:
        if bool(saved) != bool(now):
            raise CheckpointError(f"{where} was written {'with' if saved else 'without'} a "
                                  f"tokenizer ({(saved or {}).get('path')}); this config has "
                                  f"data.tokenizer={config.data.tokenizer!r}")
        return
    if saved.get("model_sha256") and now.get("model_sha256") and \
            saved["model_sha256"] != now["model_sha256"]:
        raise CheckpointError(f"{where} was trained with tokenizer {saved['path']} (sha256 "
                              f"{saved['model_sha256'][:12]}); data.tokenizer={now['path']} is a "
                              f"different model (sha256 {now['model_sha256'][:12]}): use the "
                              f"same tokenizer, or start a new train.run_dir")


def check_rng_impl(meta: dict, where: str) -> None:
    if meta.get("rng_impl") not in (None, rng_impl_name()):
        raise CheckpointError(f"{where}: PRNG implementation {meta['rng_impl']} vs "
                              f"{rng_impl_name()} now (jax_default_prng_impl)")


def check_compatible(saved_model: dict, model: ModelConfig, where: str) -> None:
    """Family, architecture and vocabulary must agree (clear errors before any shape check)."""
    if not saved_model:
        return
    for key in ("family", "architecture", "vocab_size"):
        if key in saved_model and saved_model[key] != getattr(model, key):
            raise CheckpointError(
                f"{where} holds a model with {key}={saved_model[key]!r}, but this config has "
                f"model.{key}={getattr(model, key)!r}: parameters cannot be loaded across "
                f"{'vocabularies' if key == 'vocab_size' else key + 's'}"
                + (" (use the tokenizer and vocab_size the checkpoint was trained with)"
                   if key == "vocab_size" else ""))
