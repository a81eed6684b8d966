"""SIGTERM and Ctrl-C (SIGINT) for one train() call.

Installed at the very start of train(), before the model is built, restored or compiled:
- during start-up a signal stops the run as soon as Python regains control (a compile in
  progress finishes first): there is no state to save yet, so nothing is lost;
- in the loop the first signal asks for a checkpoint at the next step boundary;
- a second Ctrl-C exits at once (earlier checkpoints stay intact: saves commit atomically).

Exit codes: SIGTERM -> EXIT_PREEMPTED (75, "temporary failure, retry"), Ctrl-C ->
EXIT_INTERRUPTED (130 = 128 + SIGINT, the shell's code for Ctrl-C). Both are resumable by
rerunning the same command.

Multi-process runs (jax.distributed) install no Python handler: jax's preemption service
catches SIGTERM in C++ on whichever host gets it, tells the coordination service, and
`reached(step)` (multihost_utils.reached_preemption_sync_point, called at every step on every
host) turns True on all hosts at the same step: one checkpoint, every host exits 75
(tests/test_multihost_faults.py sends SIGTERM to one of two processes). A Python handler here
would stop only the host that saw the signal, at its own step. Ctrl-C on one host of a
multi-process run ends that host (130) and the others then exit 1 with "lost a peer process"
(llmjax/distributed.py); resume from the last checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

import jax

from llmjax.checkpoint import EXIT_PREEMPTED

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


def exit_code_for(signum: int) -> int:
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


class StartupInterrupted(BaseException):
    """Raised from the handler while the run is starting (a BaseException, like
    KeyboardInterrupt, so library code catching Exception does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(_NAMES.get(signum, str(signum)))
        self.signum = signum


class StopSignals:
    """Context manager: `reached(step)` says whether to checkpoint and stop after `step`."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.starting = True
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                log.warning("second Ctrl-C: exiting now without a checkpoint (earlier "
                            "checkpoints are intact)")
                os._exit(EXIT_INTERRUPTED)
            return  # already stopping
        self.signum = signum
        if self.starting:
            raise StartupInterrupted(signum)
        log.warning("%s received: checkpointing at the next step boundary, then exiting with "
                    "code %d%s", _NAMES.get(signum, signum), exit_code_for(signum),
                    " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else "")

    def started(self) -> None:
        """The loop begins: signals now checkpoint instead of aborting start-up."""
        self.starting = False

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum) if self.signum is not None else EXIT_PREEMPTED

    @property
    def name(self) -> str:
        return _NAMES.get(self.signum, "SIGTERM") if self.signum is not None else "SIGTERM"

    def reached(self, step: int) -> bool:
        if self.signum is not None:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption sync manager (distributed not initialised)
                return False
        return False

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
