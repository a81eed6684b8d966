"""Where a run starts: complete already, resumed from its newest complete checkpoint (saying
which settings changed, and which torn checkpoints it skipped), initialised from
train.init_from, or fresh. Never a silent restart from step 0 when checkpoints exist."""
from __future__ import annotations

import logging
from typing import Optional

import jax
import numpy as np

from llmjax.checkpoint import CheckpointError, TornCheckpointError, TrainCheckpoints
from llmjax.checkpoint.run_meta import check_compatible, check_rng_impl, check_tokenizer
from llmjax.checkpoint.train_checkpoints import SET_ASIDE_DIR, abstract_saved_form
from llmjax.config import Config, ConfigError
from llmjax.peft.base_ref import BaseRef, reference, restore_frozen
from llmjax.train import report
from llmjax.train.experiment import Experiment
from llmjax.train.init_from import init_from
from llmjax.train.state import TrainState

log = logging.getLogger(__name__)


def restore_state(ckpt: TrainCheckpoints, step: int, exp: Experiment, abstract=None,
                  shardings=None):
    """(TrainState on exp's mesh, this process's data state, meta) of checkpoint `step`.

    The model family/vocabulary, PRNG implementation and tokenizer must match the run; a PEFT
    checkpoint's frozen base leaves are read from its base (fingerprint-checked)."""
    where = str(ckpt.step_dir(step))
    meta = ckpt.read_meta(step)
    check_compatible(meta.get("config", {}).get("model", {}), exp.model_config, where)
    check_rng_impl(meta, where)
    check_tokenizer(meta.get("tokenizer"), ckpt.config, where)
    abstract = abstract or exp.abstract_state()
    shardings = shardings or exp.state_shardings(abstract)
    base = BaseRef.from_dict(meta.get("base"))
    target = abstract_saved_form(abstract, shardings, base.leaves if base else None)
    saved, data_state = ckpt.restore(step, target)
    if base is not None:  # the frozen base leaves come from the base, fingerprint-checked
        saved["frozen"] = restore_frozen(base, abstract.frozen, shardings.frozen,
                                         saved["frozen"], where, ckpt.config.train.init_from)
        ckpt.base = base
    rng = jax.jit(lambda d: jax.random.wrap_key_data(d), out_shardings=shardings.rng)(
        saved["rng"])
    state = TrainState(step=saved["step"], params=saved["params"], frozen=saved["frozen"],
                       opt_state=saved["opt_state"], rng=rng)
    return state, data_state, meta


def finished_step(cfg: Config, ckpt: TrainCheckpoints) -> Optional[tuple[int, dict]]:
    """(step, eval metrics) of the latest checkpoint when it is complete and at or past
    train.steps (the run is done: nothing to train, nothing to write); None otherwise."""
    latest = ckpt.latest_step()
    if latest is None or latest < cfg.train.steps or not cfg.checkpoint.resume:
        return None
    if ckpt.problem(latest) is not None:  # torn: restore_or_init falls back and says so
        return None
    meta = ckpt.read_meta(latest)
    ev = meta.get("eval") or {}
    log.info("run %s is complete: checkpoint %s is at step %d (train.steps=%d); nothing to do. "
             "To train further, rerun with a larger train.steps; to export: llmjax export %s OUT",
             ckpt.run_dir, ckpt.step_dir(latest), latest, cfg.train.steps, ckpt.run_dir)
    return latest, ev


def _everywhere(ok: bool) -> bool:
    """True when `ok` on every process (one decision for all hosts)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore_newest_complete(ckpt: TrainCheckpoints, exp: Experiment, shardings=None):
    """(state, data state, meta, step) of the newest checkpoint that restores. Torn ones
    (files missing, truncated or unreadable: llmjax/checkpoint/integrity.py) are skipped with
    a warning naming each and why, and moved to run_dir/checkpoints.incomplete/ so new saves
    can take their step numbers. A checkpoint that does not fit the run is an error (an
    older one would not fit either); none complete is an error too."""
    skipped: list[tuple[int, str]] = []
    for step in reversed(ckpt.steps_on_disk()):
        problem = ckpt.problem(step)
        if _everywhere(problem is None):
            try:
                state, data_state, meta = restore_state(ckpt, step, exp, shardings=shardings)
                problem = None
            except TornCheckpointError as err:
                problem = str(err)
            if _everywhere(problem is None):
                if skipped:
                    moved = ckpt.set_aside([s for s, _ in skipped])
                    log.warning("resuming from checkpoint %d, the newest complete one; skipped "
                                "%s; moved to %s (not deleted)", step,
                                "; ".join(f"checkpoint {s}: {why}" for s, why in skipped),
                                ", ".join(map(str, moved)) or
                                f"{ckpt.run_dir / SET_ASIDE_DIR}/ by process 0")
                return state, data_state, meta, step
        skipped.append((step, problem or "unreadable on another process"))
    raise CheckpointError(
        f"{ckpt.directory} holds no complete checkpoint (" +
        "; ".join(f"checkpoint {s}: {why}" for s, why in skipped) +
        "): restore the missing files, or move the checkpoints away to start afresh")


def restore_or_init(cfg: Config, exp: Experiment, ckpt: TrainCheckpoints, state_sh):
    """(state, data state or None, resumed step or None, init report or None)."""
    if ckpt.steps_on_disk():
        if not cfg.checkpoint.resume:
            raise ConfigError(f"{ckpt.directory} holds checkpoints {ckpt.steps_on_disk()} but "
                              f"checkpoint.resume=false: choose a new train.run_dir, or delete "
                              f"them to start afresh")
        state, data_state, meta, step = restore_newest_complete(ckpt, exp, state_sh)
        if int(jax.device_get(state.step)) != step:
            raise CheckpointError(f"{ckpt.step_dir(step)} holds step "
                                  f"{int(jax.device_get(state.step))}, not {step}")
        log.info("resumed from %s (step %d)", ckpt.step_dir(step), step)
        if jax.process_index() == 0:
            for line in report.resume_changes(meta.get("config") or {}, cfg, step):
                log.info("%s", line)
        return state, data_state, step, None
    if cfg.train.init_from:
        state, init_report = init_from(exp, cfg.train.init_from)
        if jax.process_index() == 0:
            log.info("%s", init_report.summary())
        # Checkpoints reference the frozen base instead of storing it (llmjax/peft/base_ref.py).
        ckpt.base = reference(cfg.train.init_from, state.frozen, init_report)
        return state, None, None, init_report
    return exp.init_state(), None, None, None
