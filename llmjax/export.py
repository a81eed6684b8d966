"""`llmjax export RUN OUT`: a run's checkpoint as a self-contained export to share.

Default: a parameter export (config.yaml + params/ + tokenizer/), the format from_pretrained,
train.init_from, `peft merge --base` and `convert llmjax-to-hf` read, with the run's PEFT
plan applied: LoRA and IA3 folded into the kernels; prompts, prefixes and adapter layers
kept, with the matching model hooks on in config.yaml. `adapter_only`: the small adapter
export (trainable leaves + the base's path and fingerprint) that `peft merge` turns into
the same parameter export later.

Exports are written beside OUT and renamed into place (llmjax/checkpoint/params.py), so a
failure leaves OUT as it was; a non-empty OUT that is not an export is never replaced, an
earlier export only with force.
"""
from __future__ import annotations

from typing import Optional

import yaml
from etils import epath

from llmjax import peft
from llmjax import paths
from llmjax.checkpoint.location import PathLike, step_dir_of
from llmjax.checkpoint.params import commit_staged, remove_staged, staging_dir, \
    write_params_export
from llmjax.config import section_from_dict
from llmjax.errors import CheckpointError
from llmjax.loader import load_model, load_run_trees
from llmjax.peft.base_ref import read_ref


def export_run(run: PathLike, out: PathLike, step: Optional[int] = None,
               adapter_only: bool = False, force: bool = False) -> epath.Path:
    """Write the export of a run's latest (or `step`) checkpoint to OUT; returns OUT."""
    source_dir = step_dir_of(run, step)
    origin = {"run": str(paths.absolute(run, "run")), "step": _step_of(source_dir)}
    if adapter_only:
        return _export_adapter(source_dir, out, force, origin)
    source = load_model(source_dir)
    return write_params_export(out, source.params, source.model, source.tokenizer, force,
                               extra={"exported_from": {
                                   **origin, "peft": (source.config.get("peft") or {}).get(
                                       "method", "full")}})


def _step_of(directory: epath.Path) -> Optional[int]:
    return int(directory.name) if directory.name.isdigit() else None


def _export_adapter(source_dir: epath.Path, out: PathLike, force: bool, origin: dict
                    ) -> epath.Path:
    """The adapter export of a PEFT run: trainable leaves, frozen leaves not from the base,
    and the base reference (path + fingerprint) when the checkpoint has one."""
    model_cfg, trainable, stored_frozen, config = load_run_trees(source_dir, with_base=False)
    peft_cfg = section_from_dict(peft.PeftConfig, config.get("peft", {}), "peft")
    if peft_cfg.methods() == ["full"] and not peft_cfg.trainable:
        raise CheckpointError(f"{source_dir} is a full fine-tune: it has no adapter to export; "
                              f"export the parameters (without --adapter-only)")
    ref = read_ref(source_dir)
    base = ref if ref is not None else (config.get("train") or {}).get("init_from", "")
    if not base:
        raise CheckpointError(f"{source_dir} was not started from a base (train.init_from is "
                              f"empty), so an adapter alone cannot rebuild it: export the "
                              f"parameters (without --adapter-only)")
    out = paths.absolute(out, "output")
    staging = staging_dir(out, force)
    try:
        peft.save_adapter(staging, trainable, peft_cfg, model_cfg, base=base,
                          frozen=stored_frozen if ref is not None else None)
        _add_origin(staging, origin)
    except BaseException:
        remove_staged(staging)
        raise
    return commit_staged(staging, out)


def _add_origin(directory: epath.Path, origin: dict) -> None:
    path = directory / "config.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    data["exported_from"] = origin
    path.write_text(yaml.safe_dump(data, sort_keys=False))
