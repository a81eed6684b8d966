"""Where a run starts: complete already, resumed from its latest checkpoint (saying which
settings changed), initialised from train.init_from, or fresh."""
from __future__ import annotations

import logging
from typing import Optional

import jax

from llmjax.checkpoint import CheckpointError, TrainCheckpoints
from llmjax.checkpoint import init_from as load_init_from
from llmjax.config import Config, ConfigError
from llmjax.train import report
from llmjax.train.experiment import Experiment

log = logging.getLogger(__name__)


def finished_step(cfg: Config, ckpt: TrainCheckpoints) -> Optional[tuple[int, dict]]:
    """(step, eval metrics) of the latest checkpoint when it is at or past train.steps (the
    run is complete: nothing to train, nothing to write); None otherwise."""
    latest = ckpt.latest_step()
    if latest is None or latest < cfg.train.steps or not cfg.checkpoint.resume:
        return None
    meta = ckpt.read_meta(latest)
    ev = meta.get("eval") or {}
    log.info("run %s is complete: checkpoint %s is at step %d (train.steps=%d); nothing to do. "
             "To train further, rerun with a larger train.steps; to export: llmjax export %s OUT",
             ckpt.directory.parent, ckpt.step_dir(latest), latest, cfg.train.steps,
             ckpt.directory.parent)
    return latest, ev


def restore_or_init(cfg: Config, exp: Experiment, ckpt: TrainCheckpoints, state_sh):
    """(state, data state or None, resumed step or None, init report or None)."""
    latest = ckpt.latest_step()
    if latest is not None:
        if not cfg.checkpoint.resume:
            raise ConfigError(f"{ckpt.directory} holds checkpoints {ckpt.all_steps()} but "
                              f"checkpoint.resume=false: choose a new train.run_dir, or delete "
                              f"them to start afresh")
        state, data_state, meta = ckpt.restore(latest, exp, shardings=state_sh)
        if int(jax.device_get(state.step)) != latest:
            raise CheckpointError(f"{ckpt.step_dir(latest)} holds step "
                                  f"{int(jax.device_get(state.step))}, not {latest}")
        log.info("resumed from %s (step %d)", ckpt.step_dir(latest), latest)
        if jax.process_index() == 0:
            for line in report.resume_changes(meta.get("config") or {}, cfg, latest):
                log.info("%s", line)
        return state, data_state, latest, None
    if cfg.train.init_from:
        state, init_report = load_init_from(exp, cfg.train.init_from)
        if jax.process_index() == 0:
            log.info("%s", init_report.summary())
        # Checkpoints reference the frozen base instead of storing it (llmjax/peft/base_ref.py).
        from llmjax.peft.base_ref import reference
        ckpt.base = reference(cfg.train.init_from, state.frozen, init_report)
        return state, None, None, init_report
    return exp.init_state(), None, None, None
