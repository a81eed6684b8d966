"""Multi-host start-up and faults with real processes: two local `llmjax train` processes of 4 CPU
devices each, joined by jax.distributed on 127.0.0.1 exactly as on a pod (docs/multihost.md).

A fault is injected by the host itself at a given step (the child script below wraps the CLI
and passes train()'s on_step hook), so it lands at the same point on a fast or a slow machine;
the time from the fault to the survivor's exit is measured against a timestamp the faulty
host writes just before. The processes share one persistent compilation cache. The three
process faults run as one chain of launches (each relaunch resumes the previous one), which
ends identical to a run without faults.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import xla_flags

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
ARGS = ["train", str(ROOT / "configs/experiments/gpt-tiny.yaml"),
        f"train.steps={STEPS}", "train.log_every=1", "train.batch_size=16", "train.seq_len=32",
        "train.progress=false", "train.tensorboard=false", "train.plot=false",
        "train.eval_steps=1", "mesh.data=-1", "checkpoint.keep=10", "checkpoint.every=6",
        "data.synthetic_num_documents=200"]

# `python child.py ARGS...` = `llmjax ARGS...`, plus FAULT="signal:n" (SIGKILL, SIGTERM or
# SIGSTOP sent to itself after the n-th step this launch runs; the time goes to FAULT_STAMP
# first). Counted from the launch, as a resumed run starts where the last one stopped.
CHILD = textwrap.dedent('''
    import os, signal, sys, time
    import llmjax.train.trainer as trainer
    fault = os.environ.get("FAULT")
    if fault:
        name, at = fault.split(":")
        real = trainer.train
        done = []
        def on_step(step):
            done.append(step)
            if len(done) == int(at):
                with open(os.environ["FAULT_STAMP"], "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), getattr(signal, name))
        def train(cfg, *args, **kwargs):
            return real(cfg, *args, on_step=on_step, **kwargs)
        trainer.train = train
    from llmjax.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The session's compilation cache (tests/conftest.py), so the processes of every test here
    and of test_multihost.py compile the tiny model once."""
    shared = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return Path(shared) if shared else tmp_path_factory.mktemp("jax_cache")


# The variables that make a process one of several: set per test, never inherited.
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "JAX_NUM_PROCESSES",
                    "JAX_PROCESS_ID", "LLMJAX_")


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(_DISTRIBUTED_ENV)}


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("child") / "child.py"
    path.write_text(CHILD)
    return path


class Hosts:
    """Two `llmjax train` processes joined through a coordinator on 127.0.0.1."""

    def __init__(self, cache: Path, run_dir: Path, *overrides: str, env: dict | None = None,
                 per_host: tuple = ((), ()), processes: int = 2, child: Path | None = None,
                 fault: str = ""):
        port = _free_port()
        self.logs = [run_dir.parent / f"{run_dir.name}.host{i}.{port}.log"
                     for i in range(processes)]
        base = _clean_env()
        base.update(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu",
                    PYTHONPATH=str(ROOT), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES=str(processes), **(env or {}))
        self.stamp = run_dir.parent / f"{run_dir.name}.fault.{port}"
        self.procs = []
        for i in range(processes):
            env_i = {**base, "JAX_PROCESS_ID": str(i)}
            if fault and i == 1:  # the faulty host is always process 1
                env_i.update(FAULT=fault, FAULT_STAMP=str(self.stamp))
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, *([str(child)] if child else ["-m", "llmjax"]), *ARGS,
                     f"train.run_dir={run_dir}", f"train.compilation_cache={cache}",
                     *overrides, *per_host[i]],
                    env=env_i, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def survivor_exit(self, timeout: float = 120) -> tuple[int, float]:
        """(exit code of process 0, seconds from process 1's fault to that exit)."""
        deadline = time.monotonic() + timeout
        while self.procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        ended = time.time()
        code = self.procs[0].poll()
        assert code is not None, "process 0 still running:\n" + self.output(0)[-3000:]
        assert self.stamp.exists(), "process 1 never reached its fault:\n" + self.output(1)[-3000:]
        return code, ended - float(self.stamp.read_text())

    def output(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")


def train_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"split": "train"' in line for line in path.read_text().splitlines())


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields: losses, gradient norms, learning rates."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in ("time", "tokens_per_second", "flops_per_second", "mfu"):
            row.pop(key, None)
        out.append(row)
    return out


def committed(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) \
        if ckpts.is_dir() else []


def final_state(run_dir: Path) -> dict:
    """The newest checkpoint's whole train state (params, optimizer state, step, rng) as numpy
    arrays keyed by path, read with orbax directly (no model build)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    path = run_dir / "checkpoints" / str(max(committed(run_dir))) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                        is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
    state = checkpointer.restore(path, restore_args=args)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(state)}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("llmjax: error:")]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache) -> Path:
    """The reference: STEPS steps on 2 processes x 4 devices without a fault (70-80 s at load
    average 12-15, the first compile of the session included)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    hosts = Hosts(cache, run_dir)
    assert hosts.wait() == [0, 0], hosts.output(0)[-3000:]
    return run_dir


@pytest.mark.parametrize("process", [1, 0])
def test_start_up_that_cannot_complete_fails_with_one_line_after_the_timeout(tmp_path, process):
    """One process of two, LLMJAX_INIT_TIMEOUT=2. As process 1 nothing listens at the
    coordinator's address; as process 0 (the coordinator) its peer never comes. Either way: exit
    1 (relaunch: a late host joins next time) after the timeout with one line naming the address and the variable, no C++ stack trace
    (jax's own client aborts ~5 s after its timeout). Measured: 4.7 s wall each, of which 2 s
    the timeout and the rest Python and jax imports (load average 15)."""
    port = _free_port()
    env = _clean_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), LLMJAX_INIT_TIMEOUT="2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llmjax", *ARGS,
                           f"train.run_dir={tmp_path / 'run'}"], env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert f"127.0.0.1:{port}" in line and "within 2 s (LLMJAX_INIT_TIMEOUT" in line, line
    assert ("nothing answered" if process else "not all 2 processes joined") in line, line
    assert "Traceback" not in proc.stderr and "Check failure" not in proc.stderr
    assert 2 <= elapsed < 30, elapsed
    assert not (tmp_path / "run").exists()


def test_hosts_with_different_configs_all_exit_2_naming_the_fields(tmp_path, cache):
    """Host 1 has other overrides than host 0: after the start-up hash comparison every host
    exits 2 with one line naming train.steps and optimizer.learning_rate with both values.
    Measured: ~7 s for both processes (start-up and three tiny all-gathers, no train step)."""
    hosts = Hosts(cache, tmp_path / "run",
                  per_host=(("train.steps=5",), ("train.steps=6", "optimizer.learning_rate=0.1")))
    assert hosts.wait(120) == [2, 2], hosts.output(0)[-3000:] + hosts.output(1)[-3000:]
    for i in range(2):
        line = last_line(hosts.output(i))
        assert "not running the same program" in line, line
        assert "train.steps (5 vs 6)" in line and "optimizer.learning_rate" in line, line
        assert "Traceback" not in hosts.output(i)
    assert not (tmp_path / "run" / "checkpoints").exists()




def test_preemption_kill9_and_a_frozen_host_each_end_all_hosts_and_the_run_resumes_bit_exact(
        tmp_path, cache, child, straight):
    """One run, three faults of process 1, each followed by a relaunch of both processes:

    1. kill -9 after step 9 (checkpoint 6 committed or in flight): process 0's next collective
       fails (gloo: connection reset) and it exits 1 with "lost a peer process" at once,
       instead of waiting in jax's shutdown barrier (a C++ abort after ~50 s before).
       Measured: 0.2-0.4 s after the kill.
    2. SIGTERM 4 steps after the relaunch (a maintenance event on one host): jax's preemption sync point
       stops both at the same step; one checkpoint of that step; both exit 75. Measured: both
       gone 4.7-9.5 s after the signal (the sync step, then the checkpoint's save).
    3. SIGSTOP 2 steps after the next relaunch (a frozen host: its sockets stay open, so process 0's collective
       would block forever): with LLMJAX_HEARTBEAT_TIMEOUT=4 process 0's watchdog exits 1
       naming process 1. Measured: 3.4-4.4 s after the stop (silence counts from the last
       counter change it saw, up to timeout/5 before the stop).
    The last relaunch finishes; every metrics row (losses, gradient norms, evaluation) and the
    final checkpoint's whole state (parameters, optimizer moments, step, rng) are identical to
    the straight run's. 120-185 s at load average 12-15 (4 launches of 2
    processes; the whole file: ~100 s of CPU, 220 s wall at that load)."""
    run = tmp_path / "run"

    hosts = Hosts(cache, run, child=child, fault="SIGKILL:9")
    code, seconds = hosts.survivor_exit()
    hosts.wait()
    print(f"kill -9: process 0 exited {code} {seconds:.1f} s after")
    assert code == 1, hosts.output(0)[-3000:]
    assert "lost a peer process" in last_line(hosts.output(0)), hosts.output(0)[-3000:]
    assert seconds < 20
    last = max(committed(run), default=None)

    hosts = Hosts(cache, run, child=child, fault="SIGTERM:4")
    codes = hosts.wait()
    print(f"SIGTERM: both exited {time.time() - float(hosts.stamp.read_text()):.1f} s after")
    assert codes == [75, 75], hosts.output(0)[-3000:] + hosts.output(1)[-3000:]
    if last is not None:
        assert f"(step {last})" in hosts.output(0), "did not resume from the last checkpoint"
    stops = [int(line.split("stopped at step ")[1].split()[0]) for i in range(2)
             for line in hosts.output(i).splitlines() if "stopped at step " in line]
    assert len(stops) == 2 and stops[0] == stops[1] and stops[0] in committed(run), stops
    assert "Traceback" not in hosts.output(0) + hosts.output(1)

    hosts = Hosts(cache, run, child=child, fault="SIGSTOP:2",
                  env={"LLMJAX_HEARTBEAT_TIMEOUT": "4"})
    try:
        code, seconds = hosts.survivor_exit()
    finally:
        hosts.kill()
    print(f"frozen host: process 0 exited {code} {seconds:.1f} s after SIGSTOP")
    line = last_line(hosts.output(0))
    assert code == 1 and "lost a peer process" in line and "process 1 of 2" in line, \
        hosts.output(0)[-3000:]
    assert 3 <= seconds < 15  # silence counts from the last beat seen: up to timeout/5 early

    last = max(committed(run))
    hosts = Hosts(cache, run)
    assert hosts.wait() == [0, 0], hosts.output(0)[-3000:]
    assert f"(step {last})" in hosts.output(0)
    assert rows(run) == rows(straight)
    assert max(committed(run)) == max(committed(straight)) == STEPS
    resumed, reference = final_state(run), final_state(straight)
    assert resumed.keys() == reference.keys() and len(reference) > 10
    for key, value in reference.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)


# ---------------------------------------------------------------- in-process: no jax.distributed

def test_start_up_variables_are_checked_before_jax_is_asked(monkeypatch):
    """Explicit start-up needs all three variables; bad values are one-line ConfigErrors, and a
    lone process with nothing set or detected does not join anything (0.01 s)."""
    from llmjax import distributed
    from llmjax.errors import ConfigError
    for key in list(os.environ):
        if key.startswith(_DISTRIBUTED_ENV):
            monkeypatch.delenv(key)
    assert distributed.detected_cluster() is None
    assert distributed.initialize() is False
    monkeypatch.setenv("LLMJAX_DISTRIBUTED", "sometimes")
    with pytest.raises(ConfigError, match="LLMJAX_DISTRIBUTED"):
        distributed.initialize()
    monkeypatch.setenv("LLMJAX_DISTRIBUTED", "off")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:8482")
    assert distributed.initialize() is False  # off wins
    monkeypatch.delenv("LLMJAX_DISTRIBUTED")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES is not set"):
        distributed.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        distributed.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("LLMJAX_INIT_TIMEOUT", "-3")
    with pytest.raises(ConfigError, match="LLMJAX_INIT_TIMEOUT"):
        distributed.initialize()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2")
    with pytest.raises(ConfigError, match="has no port"):
        distributed._explicit_address()
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "8476")
    assert distributed._explicit_address() == "10.0.0.2:8476"
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("LLMJAX_COORDINATOR", "127.0.0.1:1234")  # today's names still work
    assert distributed._explicit_address() == "127.0.0.1:1234"


def test_program_differences_name_config_fields_packages_and_files():
    from llmjax import distributed
    base = distributed.program_of({"train": {"steps": 5, "seq_len": 32}, "model": "gpt-tiny"})
    assert distributed.differences(base, base) == []
    other = json.loads(json.dumps(base))
    other["config"]["train.steps"] = 6
    other["packages"]["jax"] = "0.4.30"
    other["code"]["cli.py"] = "0" * 16
    diff = distributed.differences(other, base)
    assert diff == ["config train.steps (5 vs 6)",
                    f"package jax ({base['packages']['jax']!r} vs '0.4.30')", "llmjax file cli.py"]
    assert "cli.py" in base["code"] and "distributed.py" in base["code"]


def test_a_lost_peer_is_exit_1_even_inside_a_user_error(monkeypatch):
    """A checkpoint save that failed because a barrier's peer vanished surfaces as a
    CheckpointError (a user error, exit 2); in a multi-process run the cause decides: lost
    peer, exit 1, relaunch. A torn checkpoint alone stays exit 2; one process: no change."""
    import jax

    from llmjax.cli import _classify
    from llmjax.errors import CheckpointError

    def failed_save():
        try:
            raise RuntimeError("INTERNAL: Barrier failed because: task is set to ERROR: "
                               "UNAVAILABLE: Task 1 heartbeat timeout")
        except RuntimeError:
            raise CheckpointError("background save of step 6 failed") from None

    with pytest.raises(CheckpointError) as caught:
        failed_save()
    torn = CheckpointError("checkpoint 6 is torn: state/manifest.ocdbt is missing")
    assert _classify(caught.value)[1] == 2  # jax.distributed not initialised here
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    message, code = _classify(caught.value)
    assert code == 1 and message.startswith("lost a peer process: INTERNAL: Barrier failed")
    assert _classify(torn) == (str(torn), 2)
