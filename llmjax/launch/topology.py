"""Cloud TPU slice types -> chips, hosts, topology: one plain table and a lookup.

A leaf: it imports neither jax nor anything of llmjax but `errors`, so launchers and planners
(`llmjax plan --target`) can share it on a machine without a TPU.

Cloud TPU names a slice `GENERATION-N`. For v4 and v5p, N counts TensorCores (2 per chip: a
v5p-128 has 64 chips); for v5e (`v5litepod-N`, also written `v5e-N`) and v6e, N counts chips.
Each chip is one jax device (v4/v5p run their two cores as one "megacore" device). Multi-host
slices have 4 chips per host; single-host v5e/v6e machines have 1, 4 or 8. The topology column
is the slice shape Cloud TPU and GKE use for that size (`cloud.google.com/gke-tpu-topology`).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from llmjax.errors import ConfigError


@dataclass(frozen=True)
class Generation:
    """What a TPU generation's slice names mean, and its defaults on TPU VMs and GKE."""
    name: str                    # generation as jax and the docs say it: v4, v5e, v5p, v6e
    prefix: str                  # how gcloud spells the accelerator type: PREFIX-N
    aliases: tuple[str, ...]     # other prefixes accepted (v5e-16 = v5litepod-16)
    counts_cores: bool           # N counts TensorCores (2 per chip) rather than chips
    runtime_version: str         # default TPU VM software version (gcloud --version)
    gke_accelerator: str         # GKE node label cloud.google.com/gke-tpu-accelerator
    gke_machine: str             # GKE machine type family: FAMILY-<chips per host>t
    topologies: dict[int, str]   # chips -> slice topology, for every size offered


# Default slice shapes of the 3D-torus generations (v4, v5p) by chip count.
_CUBES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
          256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
# 2D-torus generations (v5e, v6e): 1, 4 and 8 chips are single-host machines.
_PLANES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
           256: "16x16"}

GENERATIONS = (
    Generation("v4", "v4", (), True, "tpu-ubuntu2204-base", "tpu-v4-podslice", "ct4p-hightpu",
               _CUBES),
    Generation("v5e", "v5litepod", ("v5e",), False, "v2-alpha-tpuv5-lite",
               "tpu-v5-lite-podslice", "ct5lp-hightpu", _PLANES),
    Generation("v5p", "v5p", (), True, "v2-alpha-tpuv5", "tpu-v5p-slice", "ct5p-hightpu",
               {**_CUBES, 4096: "16x16x16", 6144: "16x16x24"}),
    Generation("v6e", "v6e", (), False, "v2-alpha-tpuv6e", "tpu-v6e-slice", "ct6e-standard",
               _PLANES),
)

MULTI_HOST_CHIPS_PER_HOST = 4


@dataclass(frozen=True)
class TpuSlice:
    """One slice type: `lookup("v5p-128")`."""
    accelerator_type: str   # as gcloud spells it: v5p-128, v5litepod-16
    generation: str         # v4, v5e, v5p, v6e
    chips: int              # = jax devices in the slice
    hosts: int              # TPU VMs (= processes of a jax run) in the slice
    chips_per_host: int     # = jax local devices per process
    topology: str           # 4x4x4, 4x4: GKE's gke-tpu-topology label, jax topology names
    runtime_version: str    # default TPU VM software version
    gke_accelerator: str    # GKE's gke-tpu-accelerator node label
    gke_machine_type: str   # GKE node pool machine type: ct5p-hightpu-4t

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def _slice(gen: Generation, chips: int) -> TpuSlice:
    per_host = chips if chips <= 8 and not gen.counts_cores else min(chips,
                                                                   MULTI_HOST_CHIPS_PER_HOST)
    n = chips * 2 if gen.counts_cores else chips
    return TpuSlice(f"{gen.prefix}-{n}", gen.name, chips, chips // per_host, per_host,
                    gen.topologies[chips], gen.runtime_version, gen.gke_accelerator,
                    f"{gen.gke_machine}-{per_host}t")


# Every slice type, by its gcloud name.
SLICES: dict[str, TpuSlice] = {
    s.accelerator_type: s
    for gen in GENERATIONS for s in (_slice(gen, chips) for chips in gen.topologies)}


def lookup(name: str) -> TpuSlice:
    """The slice called `name` (v5p-128, v5litepod-16 or v5e-16, v6e-256, v4-32); a ConfigError
    naming the valid sizes (or the nearest type) for anything else."""
    text = str(name).strip().lower()
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if match:
        for gen in GENERATIONS:
            if match.group(1) in (gen.prefix, gen.name, *gen.aliases):
                found = SLICES.get(f"{gen.prefix}-{int(match.group(2))}")
                if found:
                    return found
                sizes = ", ".join(f"{gen.prefix}-{c * 2 if gen.counts_cores else c}"
                                  for c in gen.topologies)
                what = "TensorCores (2 per chip)" if gen.counts_cores else "chips"
                raise ConfigError(f"unknown TPU type {name!r}: {gen.name} slices count "
                                  f"{what}; the sizes are {sizes}")
    close = difflib.get_close_matches(text, list(SLICES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown TPU type {name!r}: expected GENERATION-SIZE with generation "
                      f"v4, v5p, v5litepod (or v5e) or v6e, e.g. v5p-128, v5litepod-16, "
                      f"v6e-256{hint}")
