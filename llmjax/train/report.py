"""What a run says: interval lines, compile time and memory, changed settings on resume,
and the end-of-run summary. Plain strings; the trainer logs them (process 0)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from llmjax.config import Config, ConfigError, ModelConfig, OptimizerConfig, section_from_dict


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def interval_line(step: int, total: int, m: dict, elapsed: float) -> str:
    """One line per log interval (also when the progress bar is off or not a terminal)."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}",
             f"lr {m.get('learning_rate', float('nan')):.2e}",
             f"tokens/s {m['tokens_per_second']:,.0f}"]
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if m.get("nonfinite_steps"):
        parts.append(f"non-finite steps {int(m['nonfinite_steps'])}")
    parts.append(f"elapsed {duration(elapsed)}")
    return ", ".join(parts)


def compile_line(compiled, seconds: float) -> str:
    """'train step compiled in 2.5 s; per device: arguments .. MiB, temporaries .. MiB'."""
    line = f"train step compiled in {seconds:.1f} s"
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend reports it)
        mem = None
    if mem is not None:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        fields = (("arguments", "argument_size_in_bytes"), ("outputs", "output_size_in_bytes"),
                  ("temporaries", "temp_size_in_bytes"))
        known = [f"{name} {mib(getattr(mem, attr))}" for name, attr in fields
                 if getattr(mem, attr, None) is not None]
        if known:
            line += "; per device: " + ", ".join(known)
    import jax
    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_in_use" in stats:
        line += f"; device memory in use {stats['bytes_in_use'] / 2**30:,.2f} GiB"
        if stats.get("bytes_limit"):
            line += f" of {stats['bytes_limit'] / 2**30:,.2f} GiB"
    return line


# Settings whose change on resume alters what the run computes from here on.
_WATCHED = {"train": ("steps", "batch_size", "seq_len", "grad_accum"),
            "optimizer": tuple(OptimizerConfig.__dataclass_fields__),
            "model": tuple(ModelConfig.__dataclass_fields__)}  # run-time ones (dtype, remat)


def resume_changes(saved: dict, cfg: Config, step: int) -> list[str]:
    """Lines saying which settings differ from the checkpoint's and what that does."""
    changed = []
    now = cfg.to_dict()
    for section, keys in _WATCHED.items():
        for key in keys:
            old = (saved.get(section) or {}).get(key)
            if old is not None and old != now[section][key]:
                changed.append((f"{section}.{key}", old, now[section][key]))
    if not changed:
        return []
    lines = [f"resuming step {step} with changed settings: " +
             ", ".join(f"{k} {a} -> {b}" for k, a, b in changed)]
    keys = {k for k, _, _ in changed}
    if "train.steps" in keys or any(k.startswith("optimizer.") for k in keys):
        lr_old = _lr_at(saved.get("optimizer") or {}, saved["train"]["steps"], step)
        lr_new = _lr_at(now["optimizer"], cfg.train.steps, step)
        if lr_old is not None and lr_new is not None:
            lines.append(f"  the learning-rate schedule is recomputed from the new settings: "
                         f"at step {step} it was {lr_old:.3e}, it is now {lr_new:.3e} "
                         f"(optimizer moments carry over)")
    if keys & {"train.batch_size", "train.seq_len"}:
        lines.append("  the data iterator resumes only with the batch size and sequence length "
                     "it was saved with: keep them, or fine-tune from this run in a new "
                     "train.run_dir with train.init_from")
    if "train.grad_accum" in keys:
        lines.append("  the same global batch in another number of micro-batches: the same "
                     "updates up to float rounding")
    return lines


def _lr_at(optimizer: dict, steps: int, step: int) -> Optional[float]:
    from llmjax.train import optim
    try:
        opt_cfg = section_from_dict(OptimizerConfig, optimizer, "optimizer")
        _, schedule = optim.make_optimizer(opt_cfg, steps)
        return float(schedule(step))
    except (ConfigError, TypeError, ValueError, KeyError):
        return None


def summary(*, wall: float, steps: int, tokens: int, loop_seconds: float,
            final_eval: Optional[float], best_eval: Optional[float], checkpoint: Optional[Path],
            adapter: Optional[Path], run_dir: Path, finished: bool, stopped_by: str = "",
            plot: Optional[Path] = None) -> str:
    tps = tokens / loop_seconds if loop_seconds > 0 else math.nan
    status = "complete" if finished else "stopped" + (f" by {stopped_by}" if stopped_by else "")
    lines = [f"run {status}: {steps} steps in {duration(wall)}, {tokens:,} tokens at "
             f"{tps:,.0f} tokens/s (mean, compile excluded)"]
    if final_eval is not None:
        lines.append(f"  eval loss: final {final_eval:.4f}" +
                     (f", best {best_eval:.4f}" if best_eval is not None else ""))
    if checkpoint is not None:
        lines.append(f"  checkpoint: {checkpoint}")
    if adapter is not None:
        lines.append(f"  adapter: {adapter}")
    if plot is not None:
        lines.append(f"  curves: {plot}")
    if finished:
        lines.append(f"  export: llmjax export {run_dir} OUT; train further: the same command "
                     f"with a larger train.steps")
    else:
        lines.append("  resume: rerun the same command")
    return "\n".join(lines)
