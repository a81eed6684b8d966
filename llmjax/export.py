"""`llmjax export RUN OUT`: a run's checkpoint as a self-contained export to share.

Default: a parameter export (config.yaml + params/ + tokenizer/), the format from_pretrained,
train.init_from, `peft merge --base` and `convert llmjax-to-hf` read, with the run's PEFT
plan applied: LoRA and IA3 folded into the kernels; prompts, prefixes and adapter layers
kept, with the matching model hooks on in config.yaml. `adapter_only`: the small adapter
export (trainable leaves + the base's path and fingerprint) that `peft merge` turns into
the same parameter export later.

Exports are written beside OUT and renamed into place, so a failure leaves OUT as it was;
a non-empty OUT that is not an export is never replaced, an earlier export only with force.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

from llmjax.checkpoint import CHECKPOINT_DIR, CheckpointError
from llmjax.config import ModelConfig

TOKENIZER_SUBDIR = "tokenizer"


def is_export(path: Path) -> bool:
    """A parameter or adapter export (config.yaml + params/), not a run directory."""
    return ((path / "config.yaml").is_file() and (path / "params").is_dir()
            and not (path / CHECKPOINT_DIR).exists())


def _staging(out: Path, force: bool) -> Path:
    """A fresh directory beside OUT to write into (checks OUT may be replaced)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is a file: choose another OUT")
    if out.is_dir() and any(out.iterdir()):
        if not is_export(out):
            raise CheckpointError(f"{out} is not empty and not an llmjax export: choose an "
                                  f"empty or new OUT (nothing there is overwritten)")
        if not force:
            raise CheckpointError(f"{out} already holds an export: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    return staging


def _commit(staging: Path, out: Path) -> Path:
    """Swap the finished export into OUT (the old one is removed only afterwards)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out


def copy_tokenizer(src: Optional[Path], out: Path) -> bool:
    """Copy the files of a tokenizer directory (llmjax sentencepiece or HF) into out/tokenizer,
    where from_pretrained looks; False when there is none to copy."""
    if src is None or not Path(src).is_dir():
        return False
    dst = out / TOKENIZER_SUBDIR
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    return True


def write_params_export(out: str | os.PathLike, params: Any, model_cfg: ModelConfig,
                        tokenizer: Optional[Path] = None, force: bool = False,
                        extra: Optional[dict] = None) -> Path:
    """A parameter export (config.yaml with the model section, params/, tokenizer/)."""
    from llmjax.checkpoint import save_params
    out = Path(out).expanduser().absolute()
    staging = _staging(out, force)
    try:
        save_params(staging, params, model_cfg, extra=extra)
        copy_tokenizer(tokenizer, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _commit(staging, out)


def step_dir(run: str | os.PathLike, step: Optional[int] = None) -> Path:
    """The checkpoint step directory of a run (latest, or `step`); a step dir is itself."""
    run = Path(run).expanduser().absolute()
    if (run / "state").is_dir() and step is None:
        return run
    directory = run / CHECKPOINT_DIR
    if not directory.is_dir():
        raise CheckpointError(f"{run} is not a run directory (no {CHECKPOINT_DIR}/): pass the "
                              f"train.run_dir of a run")
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if not steps:
        raise CheckpointError(f"{directory} holds no finished checkpoint")
    if step is None:
        return directory / str(steps[-1])
    if step not in steps:
        raise CheckpointError(f"{run} has no checkpoint at step {step} (steps: "
                              f"{', '.join(map(str, steps))})")
    return directory / str(step)


def export_run(run: str | os.PathLike, out: str | os.PathLike, step: Optional[int] = None,
               adapter_only: bool = False, force: bool = False) -> Path:
    """Write the export of a run's latest (or `step`) checkpoint to OUT; returns OUT."""
    from llmjax.checkpoint import load_source
    source_dir = step_dir(run, step)
    origin = {"run": str(Path(run).expanduser().absolute()), "step": _step_of(source_dir)}
    if adapter_only:
        return _export_adapter(source_dir, out, force, origin)
    source = load_source(source_dir)
    return write_params_export(out, source.params, source.model, source.tokenizer, force,
                               extra={"exported_from": {
                                   **origin, "peft": (source.config.get("peft") or {}).get(
                                       "method", "full")}})


def _step_of(directory: Path) -> Optional[int]:
    return int(directory.name) if directory.name.isdigit() else None


def _export_adapter(source_dir: Path, out, force: bool, origin: dict) -> Path:
    """The adapter export of a PEFT run: trainable leaves, frozen leaves not from the base,
    and the base reference (path + fingerprint) when the checkpoint has one."""
    from llmjax import peft
    from llmjax.config import section_from_dict
    from llmjax.checkpoint import load_run_trees
    from llmjax.peft.base_ref import read_ref
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
    out = Path(out).expanduser().absolute()
    staging = _staging(out, force)
    try:
        peft.save_adapter(staging, trainable, peft_cfg, model_cfg, base=base,
                          frozen=stored_frozen if ref is not None else None)
        _add_origin(staging, origin)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _commit(staging, out)


def _add_origin(directory: Path, origin: dict) -> None:
    import yaml
    path = directory / "config.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    data["exported_from"] = origin
    path.write_text(yaml.safe_dump(data, sort_keys=False))
