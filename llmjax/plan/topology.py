"""Cloud TPU chips and slice names: a plain data table, and the parse of a `--target`.

Names are spelled as Cloud TPU spells accelerator types: `v4-32` and `v5p-128` count
TensorCores (two per chip: 16 and 64 chips), `v5e-256` / `v5litepod-16` and `v6e-256` count
chips; `v5e:4x4`, `v4:2x2x4` give the chip grid itself (jax.experimental.topologies' form).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from llmjax.errors import ConfigError
from llmjax.launch import topology as slices

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip as the planner sees it (one jax device: v4 and v5p run as megacore)."""

    generation: str  # v4 | v5e | v5p | v6e
    device_kind: str  # jax's Device.device_kind for it
    hbm_bytes: int  # HBM per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_bandwidth: float  # bidirectional inter-chip bytes/s per chip (all ports together)
    dcn_bandwidth: float  # data-center network bytes/s per chip (host NICs / chips per host)
    cores_per_chip: int  # TensorCores per chip (what v4-N / v5p-N count)
    torus_dims: int  # 2 (v5e, v6e) or 3 (v4, v5p)
    chip_config: str  # get_topology_desc's chip_config_name giving one device per chip


# Sources (Cloud TPU system-architecture pages, fetched 2026-11):
#   v4:  cloud.google.com/tpu/docs/v4 - 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; ICI: six
#        ports per chip at 50 GB/s each way (Jouppi et al., "TPU v4", ISCA 2023) = 600 GB/s
#        bidirectional; DCN: 4 chips per host, assumed 100 Gb/s per host (25 Gb/s per chip).
#   v5e: cloud.google.com/tpu/docs/v5e - 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s
#        bidirectional per chip (4 ports), hosts of 8 chips with 2 x 100 Gb/s NICs.
#   v5p: cloud.google.com/tpu/docs/v5p - 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, ICI
#        1200 GB/s bidirectional per chip, DCN 50 Gb/s per chip.
#   v6e: cloud.google.com/tpu/docs/v6e - 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, ICI 800 GB/s
#        bidirectional per chip (4 ports), hosts of 8 chips; DCN assumed 4 x 200 Gb/s per host
#        (100 Gb/s per chip).
GB = 1e9
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200 * GB, 600 * GB, 25e9 / 8, 2, 3,
               "megacore"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819 * GB, 400 * GB, 25e9 / 8, 1, 2,
                "default"),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765 * GB, 1200 * GB, 50e9 / 8, 2, 3,
                "default"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1638 * GB, 800 * GB, 100e9 / 8, 1, 2,
                "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}

# Slice shapes by size come from the one Cloud TPU slice table, llmjax/launch/topology.py.


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice (or several, joined over DCN) to compile for."""

    name: str  # as given
    chip: Chip
    shape: tuple[int, ...]  # chips along each torus axis, one slice
    slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def topology_name(self) -> str:  # jax.experimental.topologies' spelling
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    def describe(self) -> str:
        grid = "x".join(map(str, self.shape))
        over = f" x {self.slices} slices over DCN" if self.slices > 1 else ""
        return f"{self.name} ({self.num_chips} {self.chip.device_kind} chips, {grid}{over})"

    def devices(self) -> list:
        """The slice's devices from libtpu's topology description (no TPU needed)."""
        import os
        from jax.experimental import topologies
        if os.environ.get("JAX_PLATFORMS") == "cpu":
            # No TPU is opened here: several plans (or a plan and the tests) may load libtpu
            # at once without its one-process lockfile.
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        per_host = tuple(min(a, b) for a, b in zip(self.shape + (1,) * (3 - len(self.shape)),
                                                   (2, 2, 1)))
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=self.topology_name,
            chip_config_name=self.chip.chip_config, chips_per_host_bounds=per_host,
            num_slices=self.slices)
        return list(desc.devices)


def known_names() -> list[str]:
    """Examples of every spelling parse() takes, for error messages and docs."""
    out = []
    for gen in slices.GENERATIONS:
        sizes = [t.accelerator_type.rsplit("-", 1)[1] for t in slices.SLICES.values()
                 if t.generation == gen.name and t.chips >= 4]
        out.append(f"{gen.prefix}-{{{','.join(sizes)}}}")
    return out + ["v5e-N", "GEN:AxB (v5e, v6e)", "GEN:AxBxC (v4, v5p)"]


def _unknown(name: str, why: str) -> ConfigError:
    return ConfigError(f"unknown TPU target {name!r} ({why}); known: {'; '.join(known_names())}")


def parse(name: str, slices_count: int = 1) -> Target:
    """`v5e-256`, `v5litepod-16`, `v4-32`, `v5p-128`, `v6e-256`, `v5e:4x4`, `v4:2x2x1`."""
    if slices_count < 1:
        raise ConfigError(f"--slices {slices_count} must be >= 1")
    text = name.strip().lower()
    grid = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    counted = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    match = grid or counted
    gen = match and ALIASES.get(match.group(1), match.group(1))
    chip: Optional[Chip] = CHIPS.get(gen) if gen else None
    if chip is None:
        raise _unknown(name, "not a TPU generation llmjax knows")
    if grid:
        shape = tuple(int(x) for x in grid.group(2).split("x"))
        if len(shape) != chip.torus_dims and not (chip.torus_dims == 3 and len(shape) == 2):
            raise _unknown(name, f"{gen} slices are {chip.torus_dims}-D grids")
        if chip.torus_dims == 3 and len(shape) == 2:
            shape = shape + (1,)
        if 0 in shape:
            raise _unknown(name, "an empty grid")
        return Target(name, chip, shape, slices_count)
    try:
        found = slices.lookup(name)
    except ConfigError as err:
        raise _unknown(name, str(err).split(": ", 1)[-1]) from None
    return Target(name, CHIPS[found.generation],
                  tuple(int(x) for x in found.topology.split("x")), slices_count)
