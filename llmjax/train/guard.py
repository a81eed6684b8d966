"""Non-finite loss / gradient detection without a host sync per step.

The jitted step returns a per-step flag (metrics["nonfinite"], 1 when the loss or the
gradient norm is NaN/inf) and, with train.nonfinite=skip, leaves params and optimizer
state unchanged on such a step. The host keeps the flags' device arrays and reads them
only where it syncs anyway: at the metric read-backs (every train.log_every steps) and
before a checkpoint. A save also checks that the parameters themselves are finite, so
no checkpoint ever holds NaN weights.
"""
from __future__ import annotations

import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError

log = logging.getLogger(__name__)


class NonFiniteError(ConfigError):
    """Training produced NaN/inf (a ConfigError: the fix is a setting, and the CLI prints
    it as one line with exit code 2)."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class NonFiniteGuard:
    def __init__(self, mode: str):
        self.mode = mode  # "stop" | "skip"
        self.skipped = 0  # steps whose update was not applied (skip mode)
        self._pending: list[tuple[int, jax.Array]] = []

    def add(self, step: int, flag: jax.Array) -> None:
        """Remember step's flag (a device scalar; no transfer here)."""
        self._pending.append((step, flag))

    def check(self) -> list[int]:
        """The steps since the last check whose loss or gradient was not finite (one
        transfer of the pending flags)."""
        if not self._pending:
            return []
        steps = [s for s, _ in self._pending]
        flags = np.asarray(jax.device_get([f for _, f in self._pending]))
        self._pending.clear()
        bad = [s for s, f in zip(steps, flags) if f]
        if self.mode == "skip":
            self.skipped += len(bad)
        return bad

    def params_finite(self, params) -> bool:
        return bool(_all_finite(params))

    def error(self, bad: list[int], last_checkpoint: Optional[int], where) -> NonFiniteError:
        kept = (f"the last checkpoint (step {last_checkpoint}, {where}) holds finite weights and "
                f"is untouched" if last_checkpoint is not None else "no checkpoint was written")
        rerun = "resumes from it" if last_checkpoint is not None else "starts afresh"
        steps = f"step {bad[0]}" + (f" (and {len(bad) - 1} later steps)" if len(bad) > 1 else "")
        return NonFiniteError(
            f"loss or gradient norm became NaN/inf at {steps}; training stopped and {kept}; "
            f"lower optimizer.learning_rate or raise optimizer.warmup_steps, keep "
            f"optimizer.grad_clip on, or set train.nonfinite=skip to skip such steps (the same "
            f"command with the change {rerun})")
