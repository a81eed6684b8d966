"""Cloud TPU VMs through gcloud: create the slice (or a queued resource, for spot capacity and
for several slices), copy the checkout to every worker, start `llmjax train` on all of them,
wait for the exit codes, and relaunch within a restart budget.

The supervisor (`supervise`) runs where gcloud is logged in (a workstation, a small VM). The
training processes run detached on the workers (`setsid nohup`), each writing its exit code to
~/llmjax-exit-code, which the supervisor polls: a dropped ssh connection stops nothing.
After a run ends:
- 0 on every host: done. 2 anywhere: a user error, reported, not relaunched;
- 75 (preempted: every host checkpointed the same step), 1 (internal, or a peer lost), or the
  slice gone (spot capacity reclaimed; the VMs' disks with it): if the restart budget allows,
  a slice that is not healthy is deleted and created again (the queued resource waits for
  capacity), the code copied again, and the same command started: it resumes from the latest
  committed checkpoint under the gs:// run_dir.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from llmjax.launch.job import (EXIT_DONE, EXIT_PREEMPTED, EXIT_USER_ERROR, NOT_RESTARTED,
                               TrainJob)
from llmjax.launch.topology import TpuSlice

EXIT_FILE = "~/llmjax-exit-code"
LOG_FILE = "~/llmjax-train.log"
REMOTE_DIR = "llmjax"
_HEALTHY = {"READY", "ACTIVE"}  # tpu-vm state, queued-resource state
_FAILED = {"FAILED"}             # a queued resource that will never become ACTIVE
# Polls in a row that cannot reach a healthy slice's workers before the launcher gives up.
MAX_UNREACHABLE_POLLS = 10


@dataclass(frozen=True)
class Slice:
    """Where the run goes: names, zone, capacity kind."""
    tpu: TpuSlice
    name: str
    zone: str
    project: Optional[str] = None
    slices: int = 1
    spot: bool = False
    queued: bool = False        # through a queued resource (implied by --spot, --slices > 1)
    runtime_version: Optional[str] = None
    service_account: Optional[str] = None  # GCP service account of the VMs (bucket access)

    @property
    def uses_queue(self) -> bool:
        return self.queued or self.spot or self.slices > 1

    @property
    def nodes(self) -> list[str]:
        """TPU VM node names: NAME, or NAME-0 .. NAME-(k-1) for k slices (queued resources name
        a multislice request's nodes PREFIX-i)."""
        return [self.name] if self.slices == 1 else [f"{self.name}-{i}"
                                                    for i in range(self.slices)]

    def _where(self) -> list[str]:
        return ["--zone", self.zone] + (["--project", self.project] if self.project else [])


def create_commands(s: Slice) -> list[list[str]]:
    """Ask for the slice(s)."""
    runtime = s.runtime_version or s.tpu.runtime_version
    extra = (["--spot"] if s.spot else []) + (
        ["--service-account", s.service_account, "--scopes",
         "https://www.googleapis.com/auth/cloud-platform"]
        if s.service_account else [])
    if s.uses_queue:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", s.name, *s._where(),
               "--accelerator-type", s.tpu.accelerator_type, "--runtime-version", runtime]
        cmd += (["--node-id", s.name] if s.slices == 1 else
                ["--node-count", str(s.slices), "--node-prefix", s.name])
        return [cmd + extra]
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", s.name, *s._where(),
             "--accelerator-type", s.tpu.accelerator_type, "--version", runtime] + extra]


def state_command(s: Slice) -> list[str]:
    """Prints the slice's state: ACTIVE (queued resource) or READY (TPU VM) when usable."""
    if s.uses_queue:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", s.name, *s._where(),
                "--format", "value(state.state)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", s.name, *s._where(),
            "--format", "value(state)"]


def delete_commands(s: Slice) -> list[list[str]]:
    """Delete the slice(s); checkpoints in the bucket stay."""
    if s.uses_queue:  # --force deletes the queued resource's nodes too
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", s.name, *s._where(),
                 "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", s.name, *s._where(), "--quiet"]]


def ssh(s: Slice, node: str, worker: str, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *s._where(),
            f"--worker={worker}", f"--command={command}"]


def setup_commands(s: Slice, archive: str) -> list[list[str]]:
    """Copy a `git archive` of the checkout to every worker and pip install it (TPU extra)."""
    install = (f"mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/llmjax.tar.gz -C ~/{REMOTE_DIR} && "
               f"cd ~/{REMOTE_DIR} && python3 -m pip install -q -e '.[tpu]'")
    out = []
    for node in s.nodes:
        out.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                    f"{node}:~/llmjax.tar.gz", *s._where(), "--worker=all"])
        out.append(ssh(s, node, "all", install))
    return out


def start_commands(s: Slice, job: TrainJob) -> list[list[str]]:
    """Start the run detached on every worker of every slice; its exit code lands in a file."""
    run = (f"cd ~/{REMOTE_DIR} && rm -f {EXIT_FILE} && setsid nohup bash -c "
           + shlex.quote(f"{job.shell()} > {LOG_FILE} 2>&1; echo $? > {EXIT_FILE}")
           + " > /dev/null 2>&1 < /dev/null &")
    return [ssh(s, node, "all", run) for node in s.nodes]


def poll_commands(s: Slice) -> list[list[str]]:
    """One line per worker: `exit CODE`, or `running`."""
    probe = f"cat {EXIT_FILE} 2>/dev/null | sed 's/^/exit /' | grep . || echo running"
    return [ssh(s, node, "all", probe) for node in s.nodes]


def outcome(lines: Sequence[str]) -> Optional[int]:
    """The run's exit code from the workers' poll lines, None while any still runs: 2 if any
    host says so (a user error: all hosts see the same config), else 0 if all finished, else
    75 if any host was preempted, else the first failure."""
    codes, running = [], False
    for line in lines:
        parts = line.split()
        if parts[:1] == ["running"]:
            running = True
        elif parts[:1] == ["exit"] and len(parts) == 2 and parts[1].isdigit():
            codes.append(int(parts[1]))
    if running or not codes:
        return None
    if EXIT_USER_ERROR in codes:
        return EXIT_USER_ERROR
    if all(c == EXIT_DONE for c in codes):
        return EXIT_DONE
    if EXIT_PREEMPTED in codes:
        return EXIT_PREEMPTED
    return next(c for c in codes if c != EXIT_DONE)


class Runner:
    """Runs gcloud commands (subprocess), or, dry, prints them and runs nothing."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run, self.out = dry_run, out

    def show(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def __call__(self, argv: list[str], capture: bool = False) -> tuple[int, str]:
        line = _line(argv)
        self.show(line if self.dry_run else f"+ {line}")
        if self.dry_run:
            return 0, ""
        proc = subprocess.run(argv, capture_output=capture, text=True)
        return proc.returncode, proc.stdout or ""


def _line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _must(run: Runner, argv: list[str]) -> None:
    code, _ = run(argv)
    if code:
        raise RuntimeError(f"`{argv[0]} {' '.join(argv[1:5])} ...` failed with exit code {code}")


def state(run: Runner, s: Slice) -> str:
    code, out = run(state_command(s), capture=True)
    return out.strip().upper() if code == 0 else "MISSING"


def provision(run: Runner, s: Slice, archive: str, wait_seconds: float,
              sleep: Callable[[float], None]) -> None:
    """Create the slice, wait until it is usable, set it up."""
    for cmd in create_commands(s):
        _must(run, cmd)
    while (now := state(run, s)) not in _HEALTHY:  # a queued resource waits for capacity
        if now in _FAILED:
            raise RuntimeError(f"the TPU request {s.name} ended in state {now} (quota, or no "
                               f"capacity before the request expired): the console and "
                               f"`{_line(state_command(s))}` say why")
        sleep(wait_seconds)
    for cmd in setup_commands(s, archive):
        _must(run, cmd)


def supervise(job: TrainJob, s: Slice, *, archive: str, max_restarts: int, run: Runner,
              poll_seconds: float = 60.0, sleep: Callable[[float], None] = time.sleep,
              create: bool = True) -> int:
    """Provision, start, wait, relaunch after 75 / 1 / a lost slice, at most `max_restarts`
    times; returns the run's exit code (0 done, 2 user error, else the last failure)."""
    if run.dry_run:
        return dry_run_plan(job, s, archive, max_restarts, run, create)
    if create:
        provision(run, s, archive, poll_seconds, sleep)
    restarts = 0
    while True:
        for cmd in start_commands(s, job):
            _must(run, cmd)
        code, unreachable = None, 0
        while code is None:
            sleep(poll_seconds)
            lines, lost = [], False
            for cmd in poll_commands(s):
                rc, out = run(cmd, capture=True)
                lost |= rc != 0
                lines += out.splitlines()
            if lost and state(run, s) not in _HEALTHY:
                code = EXIT_PREEMPTED  # the slice went away under the run: capacity reclaimed
            elif lost:
                unreachable += 1
                if unreachable >= MAX_UNREACHABLE_POLLS:
                    raise RuntimeError(f"cannot reach the workers of {s.name} over ssh "
                                       f"({unreachable} polls in a row) although the slice is "
                                       f"up: check `{_line(poll_commands(s)[0])}`; the run may "
                                       f"still be going")
            else:
                unreachable, code = 0, outcome(lines)
        if code in NOT_RESTARTED:
            run.show(f"llmjax launch: run ended with exit code {code}"
                     + (" (a user error: fix it and launch again)" if code else ""))
            return code
        if restarts >= max_restarts:
            run.show(f"llmjax launch: exit code {code} and the restart budget "
                     f"({max_restarts}) is spent; the checkpoints stay in {job.run_dir}")
            return code
        restarts += 1
        run.show(f"llmjax launch: exit code {code}; relaunch {restarts} of {max_restarts}")
        if state(run, s) not in _HEALTHY:
            for cmd in delete_commands(s):
                run(cmd)
            provision(run, s, archive, poll_seconds, sleep)


def dry_run_plan(job: TrainJob, s: Slice, archive: str, max_restarts: int, run: Runner,
                 create: bool = True) -> int:
    """Print the commands `supervise` runs, in order, with the relaunch loop as comments."""
    show = run.show
    show(f"# {s.tpu.accelerator_type} x {s.slices}: {s.tpu.hosts * s.slices} hosts, "
         f"{s.tpu.chips * s.slices} chips; run_dir {job.run_dir}")
    for note in job.notes:
        show(f"# note: {note}")
    show(f"# the checkout (git ls-files, plus tokenizers/ if present) packed into {archive}")
    show("# 1. ask for the slice" + (" (spot capacity)" if s.spot else "")
         + (" (skipped with --existing, like 2 and 3)" if not create else ""))
    for cmd in create_commands(s):
        run(cmd)
    show("# 2. wait until it prints " + (" or ".join(sorted(_HEALTHY))))
    run(state_command(s))
    show("# 3. copy the checkout to every worker and install it")
    for cmd in setup_commands(s, archive):
        run(cmd)
    show("# 4. start the run on every worker (detached; exit code to " + EXIT_FILE + ")")
    for cmd in start_commands(s, job):
        run(cmd)
    show("# 5. every poll interval: `exit CODE` per worker once done")
    for cmd in poll_commands(s):
        run(cmd)
    show(f"# 6. exit 0: done; 2: user error, stop; 75, 1 or the slice gone: relaunch (at most "
         f"{max_restarts} times): if step 2 no longer prints READY/ACTIVE, delete and redo 1-3:")
    for cmd in delete_commands(s):
        run(cmd)
    show("#    then step 4 again: the run resumes from its latest checkpoint")
    return 0
