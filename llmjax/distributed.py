"""Multi-host runs: start-up through jax.distributed, the same-program check across hosts, and
leaving quickly (with a message saying why) when a peer host is lost.

Start-up (`initialize`, before anything touches a device):
- explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID (jax's own
  names; LLMJAX_COORDINATOR / LLMJAX_NUM_PROCESSES / LLMJAX_PROCESS_ID are accepted too);
- detected: Cloud TPU VMs and GKE TPU pods, SLURM (srun) and Open MPI, by jax's cluster
  detection; the coordinator port is then JAX_COORDINATOR_PORT or jax's default (8482 on TPU
  in jax 0.10; older releases used 8476, so open the one your jax uses, or set the variable);
- LLMJAX_DISTRIBUTED=off skips it, =on calls jax.distributed.initialize() even where nothing
  was detected (jax then raises if it cannot find the parameters);
- LLMJAX_INIT_TIMEOUT (seconds, default 300): how long a process waits for the coordinator
  and its peers before it gives up with a one-line error;
- LLMJAX_HEARTBEAT_TIMEOUT (seconds, default 100): a peer silent this long counts as lost.

Start-up that does not complete (nothing listening at the coordinator; not every process
joined) ends every process after LLMJAX_INIT_TIMEOUT with one line and exit 1 (relaunch: a late
host joins next time), before jax's client would abort with a C++ stack trace. Bad variables
are user errors (exit 2).

Faults (docs/multihost.md): a peer that dies shows up as a failed collective (gloo on CPU:
connection reset) or, where a collective would block forever (a frozen host, a dead TPU peer),
only as silence: the watchdog below notices it after LLMJAX_HEARTBEAT_TIMEOUT. Either way the
process prints "lost a peer process" and exits 1 at once (`leave`), skipping jax's shutdown
barrier, which would wait for the dead peer and then abort. jax's own heartbeat check (twice
the timeout) stays as a backstop; when the coordinator process itself dies, jax's client may
get there first, aborting (exit 134) with its own "another task died" message.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from llmjax.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 1  # a relaunch resumes from the last committed checkpoint
EXIT_STARTUP_TIMEOUT = 1  # a relaunch may find the late host; a wrong address fails again
DEFAULT_INIT_TIMEOUT = 300
DEFAULT_HEARTBEAT_TIMEOUT = 100

# jax's detectors for the environments llmjax supports without explicit variables (the generic
# Kubernetes and mpi4py detectors are left out: any pod or MPI install would trigger them).
_DETECTED = ("GceTpuCluster", "GkeTpuCluster", "SlurmCluster", "OmpiCluster")

# Set once this process has decided to exit (an error, or all hosts failing the same check):
# an error the coordination service reports after that is the others leaving, not news.
_leaving = threading.Event()


def _env(*names: str) -> Optional[str]:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _seconds(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} must be a whole number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be a positive number of seconds")
    return value


def _int_env(names: tuple[str, ...], what: str) -> int:
    raw = _env(*names)
    if raw is None:
        raise ConfigError(f"{names[0]} is not set: a coordinator address was given, so every "
                          f"process also needs {what} ({' or '.join(names)})")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{names[0]}={raw!r} must be an integer ({what})") from None


def detected_cluster() -> Optional[str]:
    """Name of the jax cluster environment found here (TPU VM, GKE TPU, SLURM, Open MPI)."""
    from jax._src import clusters
    for env in clusters.ClusterEnv._cluster_types:
        if env.__name__ in _DETECTED and not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None


def _explicit_address() -> Optional[str]:
    address = _env("JAX_COORDINATOR_ADDRESS", "LLMJAX_COORDINATOR")
    if address and ":" not in address.rsplit("]", 1)[-1]:  # host without a port
        port = _env("JAX_COORDINATOR_PORT")
        if not port:
            raise ConfigError(f"coordinator address {address!r} has no port: write host:port "
                              f"or set JAX_COORDINATOR_PORT")
        address = f"{address}:{port}"
    return address


def initialize() -> bool:
    """jax.distributed.initialize when this is one of several processes; True if it ran."""
    import jax
    mode = (_env("LLMJAX_DISTRIBUTED") or "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"LLMJAX_DISTRIBUTED={mode!r}: use auto, on or off")
    if mode == "off" or jax.distributed.is_initialized():
        return False
    init_timeout = _seconds("LLMJAX_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT)
    heartbeat = _seconds("LLMJAX_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT)
    # jax's own check backs ours up at twice the time (it aborts with a C++ stack trace).
    kwargs: dict[str, Any] = dict(initialization_timeout=init_timeout,
                                  heartbeat_timeout_seconds=2 * heartbeat)
    address = _explicit_address()
    if address:
        address, processes, process = address, _int_env(
            ("JAX_NUM_PROCESSES", "LLMJAX_NUM_PROCESSES"), "the number of processes"), _int_env(
            ("JAX_PROCESS_ID", "LLMJAX_PROCESS_ID"), "its own index from 0")
        where = "explicit"
    elif mode == "on" or detected_cluster():
        where = detected_cluster() or "jax auto-detection"
        address, processes, process = _detect(init_timeout)
    else:
        return False  # one process on its own
    kwargs.update(coordinator_address=address, num_processes=processes, process_id=process)
    log.info("joining %s processes through jax.distributed as process %s (%s; coordinator %s, "
             "start-up timeout %d s, heartbeat timeout %d s)", processes, process, where,
             address, init_timeout, heartbeat)
    began = time.monotonic()
    if address and process not in (0, None):
        _wait_for_coordinator(address, init_timeout)
        kwargs["initialization_timeout"] = max(1, int(init_timeout - (time.monotonic() - began)))
    # jax's client aborts with a C++ stack trace ~5 s after its own timeout when not every
    # process registers: say what happened first, in one line (exit 1: a host that came up late
    # joins on the relaunch; a wrong address fails again and spends the restart budget).
    timer = threading.Timer(kwargs["initialization_timeout"], leave, args=(
        f"jax.distributed start-up: not all {processes} processes joined at the coordinator "
        f"{address} within {init_timeout} s (LLMJAX_INIT_TIMEOUT); check that every host was "
        f"launched, with the same JAX_NUM_PROCESSES and coordinator address, and the logs of "
        f"the hosts that did not join", EXIT_STARTUP_TIMEOUT))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # noqa: BLE001 - jax raises ValueError/JaxRuntimeError here
        leave(f"jax.distributed start-up failed ({where}, coordinator {address}): "
              f"{' '.join(str(err).split())[:300]}", 2)
    finally:
        timer.cancel()
    _start_watchdog(heartbeat)
    log.info("process %d of %d, %d local devices of %d", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _detect(timeout: int) -> tuple[Optional[str], Optional[int], Optional[int]]:
    """Coordinator address, process count and index from jax's cluster detection (the values
    jax.distributed.initialize() would find itself), so the address can be checked first."""
    from jax._src import clusters
    address, processes, process, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, timeout)
    return address, processes, process


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Before jax's client connects: wait until the coordinator's port accepts a connection.

    jax's client, when it cannot register within its timeout, aborts the whole process with a
    C++ stack trace (its error callback cannot be replaced from Python in jaxlib 0.10.2: a
    Python callback fails with std::bad_cast). Waiting here first turns the commonest start-up
    failure (nothing listening: wrong address, blocked port, process 0 not started) into one
    line and exit 1 after the timeout."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                leave(f"jax.distributed start-up: nothing answered at the coordinator {address} "
                      f"within {timeout:.0f} s (LLMJAX_INIT_TIMEOUT; last error: {err}); check "
                      f"that process 0 runs and that this address and port are right and open "
                      f"between the hosts (firewall; JAX_COORDINATOR_PORT)", EXIT_STARTUP_TIMEOUT)
        time.sleep(0.25)


class _Watchdog(threading.Thread):
    """Notices a lost peer even where a collective would block forever (a frozen host, a TPU
    collective waiting on a dead chip): every process bumps a counter in the coordination
    service's key-value store every `timeout / 5` s and reads everyone's (one request); a peer
    whose counter has not moved for `timeout` s, or a coordinator that stops answering, ends
    this process with "lost a peer process" and exit 1.

    jax's own heartbeat check (set to twice this timeout) would also end the process, but with
    a C++ abort and stack trace; its Python callback hook cannot be used in jaxlib 0.10.2
    (passing one fails with std::bad_cast)."""

    PREFIX = "llmjax/alive/"
    DONE = "exited"

    def __init__(self, client: Any, process: int, processes: int, timeout: float):
        super().__init__(name="llmjax-peer-watchdog", daemon=True)
        self.client, self.process, self.processes, self.timeout = (
            client, process, processes, timeout)
        self.stop = threading.Event()

    def finish(self) -> None:
        """This process is exiting normally: stop, and tell the others not to wait for it."""
        self.stop.set()
        try:
            self.client.key_value_set(f"{self.PREFIX}{self.process}", self.DONE,
                                      allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service may already be gone; nothing to tell
            pass

    def run(self) -> None:
        beat = 0
        seen: dict[int, tuple[str, float]] = {}
        while not self.stop.wait(self.timeout / 5):
            beat += 1
            try:
                self.client.key_value_set(f"{self.PREFIX}{self.process}", str(beat),
                                          allow_overwrite=True)
                values = {key.rsplit("/", 1)[-1]: value
                          for key, value in self.client.key_value_dir_get(self.PREFIX)}
            except Exception as err:  # noqa: BLE001 - the service itself is gone
                if self.stop.is_set() or _leaving.is_set():
                    return
                detail = " ".join(str(err).split())[:200]
                leave(f"lost a peer process: the coordinator (process 0) stopped answering "
                      f"({detail}); {_RELAUNCH}", EXIT_PEER_LOST)
                return
            now = time.monotonic()
            for peer in range(self.processes):
                if peer == self.process:
                    continue
                value = values.get(str(peer), "")
                if value == self.DONE:
                    continue  # finished and leaving normally
                if peer not in seen or seen[peer][0] != value:
                    seen[peer] = (value, now)
                elif now - seen[peer][1] > self.timeout and not self.stop.is_set():
                    leave(f"lost a peer process: process {peer} of {self.processes} sent no "
                          f"sign of life for {self.timeout:.0f} s (LLMJAX_HEARTBEAT_TIMEOUT); "
                          f"{_RELAUNCH}", EXIT_PEER_LOST)
                    return


def _start_watchdog(timeout: float) -> None:
    import atexit

    import jax
    from jax._src import distributed as jax_distributed
    client = getattr(jax_distributed.global_state, "client", None)
    if client is None or jax.process_count() == 1:
        return
    dog = _Watchdog(client, jax.process_index(), jax.process_count(), timeout)
    # atexit runs last-registered first: this stops the watchdog before jax's own handler
    # shuts the coordination service down (a normal exit is not a lost peer).
    atexit.register(dog.finish)
    dog.start()


_RELAUNCH = ("this process stops now (exit 1); relaunch every host to resume from the last "
             "committed checkpoint")

_PEER_SIGNS = ("connection reset", "connection closed", "connection refused", "broken pipe",
               "socket closed", "heartbeat", "unavailable", "task is set to error",
               "gloo", "barrier failed", "coordination service")


def peer_lost_message(err: BaseException) -> Optional[str]:
    """For an error raised in a multi-process run: the one-line message if it, or an error it
    was raised from (a checkpoint save that failed because a barrier failed), says a peer went
    away: a collective or barrier whose other side vanished. Checked before the user-error
    classification, so a lost peer is exit 1 (relaunch), never 2."""
    jax = sys.modules.get("jax")  # no jax imported: no distributed run (and no import here)
    if jax is None or not jax.distributed.is_initialized():
        return None
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in ("JaxRuntimeError", "XlaRuntimeError", "RuntimeError"):
            text = " ".join(str(current).split())
            if any(sign in text.lower() for sign in _PEER_SIGNS):
                return f"lost a peer process: {text[:240]}; {_RELAUNCH}"
        current = current.__cause__ or current.__context__
    return None


def leave(message: str, code: int) -> None:
    """Print one error line and end this process now, skipping jax's shutdown barrier (the
    peers it would wait for are gone, or will leave the same way)."""
    _leaving.set()
    try:
        sys.stdout.flush()
        print(f"llmjax: error: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
    finally:
        os._exit(code)


# ---------------------------------------------------------------- the same program on every host

def code_digests() -> dict[str, str]:
    """sha256 of every installed llmjax source file (relative path -> digest)."""
    root = Path(__file__).resolve().parent
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(root.rglob("*.py"))}


def package_versions() -> dict[str, str]:
    from importlib import metadata
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def program_of(config_dict: dict) -> dict:
    """What must be identical on every host: resolved config, llmjax code, key packages."""
    return {"config": _flat(config_dict), "code": code_digests(),
            "packages": package_versions()}


def differences(mine: dict, theirs: dict, limit: int = 8) -> list[str]:
    """Human-readable differences between two program_of() documents."""
    out = []
    for section, label in (("config", "config"), ("packages", "package"), ("code", "llmjax file")):
        a, b = mine.get(section, {}), theirs.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                if section == "code":
                    out.append(f"{label} {key}")
                else:
                    out.append(f"{label} {key} ({b.get(key, '<absent>')!r} vs "
                               f"{a.get(key, '<absent>')!r})")
    if len(out) > limit:
        out = out[:limit] + [f"and {len(out) - limit} more"]
    return out


def check_same_program(config_dict: dict) -> None:
    """Every host must run the same config and code: compare digests across hosts (one small
    all-gather); on a mismatch every host raises the same ConfigError naming the fields."""
    import jax
    import numpy as np
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    doc = program_of(config_dict)
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    digest = np.frombuffer(hashlib.sha256(blob).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if (digests == digests[0]).all():
        return
    # Different somewhere: every host gathers every document (padded to one length) so each
    # can name the differences, and all raise the same error together.
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(blob))))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(blob)] = np.frombuffer(blob, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    docs = [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]
    _leaving.set()  # the peers exit now too: their leaving is expected
    parts = []
    for index, other in enumerate(docs[1:], start=1):
        diff = differences(other, docs[0])
        if diff:
            parts.append(f"process {index} differs from process 0 in " + ", ".join(diff))
    raise ConfigError("the hosts are not running the same program: " + "; ".join(parts) +
                      " (values: process 0's vs the other's); run the same command, config "
                      "and llmjax installation on every host")
