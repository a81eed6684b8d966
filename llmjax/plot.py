"""`llmjax plot RUN_DIR [RUN_DIR ...]`: training curves of one or more runs as one PNG.

Reads each run's metrics.jsonl (one JSON object per line: step, split, metrics) and draws
loss, eval loss, learning rate and tokens/s, the runs overlaid. Tolerant of what real runs
leave behind: NaN or null values (a diverged step), keys a run never logged, and a truncated
last line (a killed run). Uses matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

from llmjax import metrics_files, paths
from llmjax.errors import ConfigError

# (title, split, metric key) of each panel.
PANELS = (
    ("training loss", "train", "loss"),
    ("validation loss", "eval", "loss"),
    ("learning rate", "train", "learning_rate"),
    ("tokens/s", "train", "tokens_per_second"),
)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of run_dir/metrics.jsonl (or its metrics/ chunks on object storage),
    skipping lines that are not JSON objects."""
    if not metrics_files.has_metrics(run_dir):
        what = "does not exist" if not paths.resolve(run_dir, "run directory").exists() else "has no metrics.jsonl"
        raise ConfigError(f"run directory {str(run_dir)!r} {what}; pass directories that "
                          f"`llmjax train` wrote (train.run_dir)")
    return metrics_files.read_rows(run_dir)


def series(records: Sequence[dict], split: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, leaving out missing, null and non-finite values."""
    steps, values = [], []
    for r in records:
        if r.get("split", "train") != split:
            continue
        step, value = r.get("step"), r.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_path: Optional[str | os.PathLike] = None) -> Path:
    """Write the curves of `run_dirs` (overlaid) to out_path (default: first run's curves.png)."""
    if not run_dirs:
        raise ConfigError("plot needs at least one run directory")
    runs = [(paths.resolve(d, "run directory"), read_metrics(d)) for d in run_dirs]
    out = paths.resolve(out_path, "--out") if out_path else runs[0][0] / "curves.png"
    if out.suffix.lower() != ".png":
        raise ConfigError(f"plot writes PNG images; name the output *.png, not {str(out)!r}")
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("llmjax plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI

    figure = Figure(figsize=(11, 7), layout="constrained")
    axes = figure.subplots(2, 2).flat
    labels = _labels([d for d, _ in runs])
    for ax, (title, split, key) in zip(axes, PANELS):
        drawn = 0
        for (run_dir, records), label in zip(runs, labels):
            steps, values = series(records, split, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=label)
                drawn += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn and len(runs) > 1:
            ax.legend(fontsize="small")
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:  # a file object: works for gs:// too
        figure.savefig(f, dpi=100, format="png")
    return out


def _labels(dirs: Sequence[Path]) -> list[str]:
    """Run names for the legend: the directory names, or longer paths where names collide."""
    names = [d.name or str(d) for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]
