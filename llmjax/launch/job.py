"""What every launcher runs: one `llmjax train CONFIG overrides` command, checked before any
machine is asked for, and the exit-code contract the launchers restart on.

The config is loaded here (YAML + overrides, validation; no jax) so a typo fails on the
laptop, not an hour later on a pod. The run directory must be on object storage whenever
the run spans machines that come and go: TPU VMs and GKE nodes lose their disks with them.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from llmjax.errors import ConfigError

# The exit-code contract of `llmjax train` (docs/pods.md).
EXIT_DONE = 0          # trained to train.steps
EXIT_INTERNAL = 1      # a bug, or a peer host lost: relaunch resumes from the last checkpoint
EXIT_USER_ERROR = 2    # bad config or input: relaunching cannot help
EXIT_PREEMPTED = 75    # SIGTERM: every host checkpointed the same step and stopped; relaunch

# Exit codes a launcher relaunches on (within its restart budget): every failure but a user error.
NOT_RESTARTED = (EXIT_DONE, EXIT_USER_ERROR)

# jax.distributed's coordinator port when the launcher sets it (jax's own TPU default in 0.10).
DEFAULT_COORDINATOR_PORT = 8482

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/*")


def check_remote_path(value: str, key: str, why: str) -> None:
    """`value` must be a well-formed gs:// URL; else a one-line ConfigError saying `why`."""
    scheme = _SCHEME.match(value or "")
    if scheme and scheme.group(1).lower() in ("gs", "gcs") and not value.startswith("gs://"):
        raise ConfigError(f"{key}={value!r} is not a bucket URL: write gs://BUCKET/PATH")
    if not value.startswith("gs://") or len(value) <= len("gs://"):
        raise ConfigError(f"{key}={value!r} is a local path, but {why}: put it in a bucket "
                          f"(--bucket gs://BUCKET/runs/NAME)")


@dataclass(frozen=True)
class TrainJob:
    """The training command every host runs, with the paths it was checked against."""
    config: str
    overrides: tuple[str, ...]
    run_dir: str
    data_dir: str
    name: str
    python: str = "python3"
    notes: tuple[str, ...] = field(default=())

    def argv(self) -> list[str]:
        """`python3 -m llmjax train CONFIG overrides...` (run_dir and data_dir passed)."""
        return [self.python, "-m", "llmjax", "train", self.config, *self.overrides]

    def shell(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv())


def job_name(config: str, name: str | None) -> str:
    """A DNS-1035 label (Kubernetes and TPU names): --name, else the config file's stem."""
    raw = name or re.sub(r"\.ya?ml$", "", config.replace("\\", "/").rsplit("/", 1)[-1])
    label = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    label = ("llmjax-" + label if not label[:1].isalpha() else label)[:40].rstrip("-")
    if name and label != name:
        raise ConfigError(f"--name {name!r} must be lower-case letters, digits and '-', "
                          f"starting with a letter (at most 40 characters), e.g. {label!r}")
    return label


def host_config_path(config: str) -> tuple[str, Optional[str]]:
    """CONFIG as the hosts see it: relative to the checkout they get (TPU VMs: a copy of this
    one; GKE: the image built from it) when it lies inside this checkout; else as given, with
    a note."""
    checkout = Path(__file__).resolve().parents[2]
    resolved = Path(config).resolve()
    if resolved.is_relative_to(checkout):
        return resolved.relative_to(checkout).as_posix(), None
    return config, (f"{config} is outside this checkout ({checkout}): every host must have it "
                    f"at that path")


def train_job(config: str, overrides: Sequence[str], *, bucket: str | None,
              data_dir: str | None, name: str | None, remote: str | None,
              python: str = "python3") -> TrainJob:
    """Load and validate `config` + `overrides` (plus --bucket / --data-dir) and return the job.

    `remote` says why the paths must be in a bucket (None: they may be local, e.g. a SLURM
    cluster's shared filesystem); with it, train.run_dir must be gs:// and a local
    data.data_dir is reported in `notes`."""
    from llmjax import config as config_module
    extra = list(overrides)
    if bucket:
        extra.append(f"train.run_dir={bucket}")
    if data_dir:
        extra.append(f"data.data_dir={data_dir}")
    cfg = config_module.load(config, extra)
    run_dir, data = cfg.train.run_dir, cfg.data.data_dir
    notes = []
    if remote:
        check_remote_path(run_dir, "train.run_dir", remote)
        if data and cfg.data.source in ("text", "tfds"):
            if data.startswith("gs:") and not data.startswith("gs://"):
                check_remote_path(data, "data.data_dir", remote)
            if not data.startswith("gs://"):
                notes.append(f"data.data_dir={data!r} is local: every host prepares its own "
                             f"copy, again after each relaunch; --data-dir gs://BUCKET/data "
                             f"shares one")
    host_config = config
    if remote:
        host_config, note = host_config_path(config)
        notes += [note] if note else []
    return TrainJob(host_config, tuple(extra), run_dir, data, job_name(config, name), python,
                    tuple(notes))
