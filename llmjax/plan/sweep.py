"""`llmjax plan --sweep`: compile the train step over mesh factorisations, remat policies
and per-chip batch sizes, keep those that fit and rank them by estimated tokens/s."""
from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

from llmjax import config as config_mod
from llmjax.config import Config
from llmjax.errors import ConfigError
from llmjax.plan.aot import Plan, plan
from llmjax.plan.topology import Target

REMATS = ("full", "dots", "none")  # the one most likely to fit first, then faster ones
BATCHES = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class Choice:
    data: int
    fsdp: int
    tensor: int
    remat: str
    per_chip_batch: int  # sequences per chip per step (global batch = this x chips)
    expert: int = 1  # MoE expert-parallel axis (the sweep keeps it at 1)

    def overrides(self, target: Target) -> list[str]:
        return [f"mesh.data={self.data}", f"mesh.fsdp={self.fsdp}", f"mesh.tensor={self.tensor}",
                f"mesh.expert={self.expert}",
                f"mesh.dcn_data={target.slices}", f"model.remat={self.remat}",
                f"train.batch_size={self.per_chip_batch * target.num_chips}",
                "train.grad_accum=1"]

    def label(self) -> str:
        expert = f" x expert {self.expert}" if self.expert > 1 else ""
        return (f"data {self.data} x fsdp {self.fsdp}{expert} x tensor {self.tensor}, remat "
                f"{self.remat}, {self.per_chip_batch}/chip")


def choices(cfg: Config, target: Target) -> Iterator[Choice]:
    """FSDP-heavy meshes and large batches first, full remat first within them (what fits
    most often, then the faster policies); tensor only where it divides the heads; data
    over DCN stays as --slices gives it."""
    n = target.chips_per_slice
    heads = cfg.model.num_heads
    meshes = [(d, n // (d * t), t) for t in (1, 2, 4, 8) if heads % t == 0 and n % t == 0
              for d in (1, 2, 4, 8, 16) if (n // t) % d == 0]
    meshes.sort(key=lambda m: (m[2], m[0]))
    for batch, (d, f, t), remat in itertools.product(sorted(BATCHES, reverse=True), meshes,
                                                     REMATS):
        if (batch * target.num_chips) % (d * f * target.slices) == 0:
            yield Choice(d, f, t, remat, batch)


@dataclasses.dataclass
class Row:
    choice: Choice
    plan: Optional[Plan]
    error: str = ""


def sweep(path: str, overrides: list[str], target: Target, max_configs: int,
          progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[Row]:
    """Compile up to `max_configs` candidates (those that do not fit by arithmetic alone
    are reported without a compile and do not count)."""
    base = config_mod.load(path, overrides)
    rows: list[Row] = []
    compiled = 0
    too_big: set = set()  # (mesh, batch) where full remat, the leanest policy, did not fit
    for choice in choices(base, target):
        if compiled >= max_configs:
            break
        mesh_batch = (choice.data, choice.fsdp, choice.tensor, choice.per_chip_batch)
        if mesh_batch in too_big:
            continue  # dots / none keep more activations than full remat: no compile needed
        try:
            cfg = config_mod.load(path, overrides + choice.overrides(target))
            result = plan(cfg, target, steps=("train",))
        except ConfigError as err:
            rows.append(Row(choice, None, str(err)))
            progress(f"  skip {choice.label()}: {err}")
            continue
        compiled += result.compiled
        rows.append(Row(choice, result))
        if not result.fits and choice.remat == "full":
            too_big.add(mesh_batch)
        if result.fits:
            progress(f"  [{compiled}/{max_configs}] {choice.label()}: fits, step "
                     f"{result.step_seconds * 1e3:,.1f} ms, MFU {result.mfu * 100:.1f}%")
        else:
            progress(f"  [{compiled}/{max_configs}] {choice.label()}: does not fit "
                     f"({result.shortfall / 2**20:,.0f} MiB over)")
    return rows


def ranked(rows: list[Row]) -> list[Row]:
    fit = [r for r in rows if r.plan is not None and r.plan.fits and r.plan.train is not None]
    return sorted(fit, key=lambda r: -r.plan.tokens_per_second)


def format_table(rows: list[Row]) -> str:
    lines = [f"{'rank':>4}  {'configuration':52s} {'HBM/chip':>10} {'step ms':>9} "
             f"{'MFU %':>6} {'tokens/s':>12}"]
    for i, r in enumerate(ranked(rows), 1):
        p = r.plan
        total = max(s.memory.total for s in p.steps.values())
        lines.append(f"{i:>4}  {r.choice.label():52s} {total / 2**30:>8.2f}Gi "
                     f"{p.step_seconds * 1e3:>9,.1f} {p.mfu * 100:>6.1f} "
                     f"{p.tokens_per_second:>12,.0f}")
    if len(lines) == 1:
        lines.append("      (no configuration fits)")
    return "\n".join(lines)


def write_best(path: str, overrides: list[str], target: Target, best: Row, out: str) -> Path:
    """The config with the sweep's best choice applied, as a YAML file `llmjax train` takes
    (checked by loading it back)."""
    data = config_mod.read_yaml(path)
    for override in overrides + best.choice.overrides(target):
        config_mod.apply_override(data, override)
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# llmjax plan --sweep of {path} for {target.describe()}: best of the "
              f"configurations that fit\n# ({best.choice.label()}; estimated "
              f"{best.plan.step_seconds * 1e3:,.1f} ms/step, MFU {best.plan.mfu * 100:.1f}%)\n")
    dest.write_text(header + yaml.safe_dump(data, sort_keys=False))
    config_mod.load(dest)  # it must load as it is
    return dest
