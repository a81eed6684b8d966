"""The training loop: data -> step -> metrics -> eval -> checkpoint.

The host only feeds token ids (prefetched onto the mesh) and dispatches the
jitted step; it reads metrics back only every `train.log_every` steps, so the
device never waits on the host in between.

Checkpoints (llmjax/checkpoint/): a run directory with checkpoints resumes
from the newest complete one exactly (train state, PRNG, data iterator position;
torn ones are skipped with a warning: llmjax/train/resume.py); a checkpoint that
does not fit the run is an error, never a silent fresh start. A background save
that fails stops the loop at the next step with a CheckpointError.
Saves are asynchronous every `checkpoint.every` steps / `checkpoint.every_minutes` and at
the end; SIGTERM or Ctrl-C saves at the next step boundary and returns exit code 75 / 130
(llmjax/train/signals.py). A step with a NaN/inf loss or gradient stops the run or is
skipped (train.nonfinite, llmjax/train/guard.py); no checkpoint ever holds NaN weights.
`train.init_from` (fine-tuning) loads parameters only into a fresh state. A run whose
latest checkpoint is at train.steps says so and does nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import yaml

from llmjax import parallel, paths, peft
from llmjax.checkpoint import CheckpointError, TrainCheckpoints
from llmjax.config import Config
from llmjax.data.device import prefetch_to_device
from llmjax.metrics import MetricsWriter, flops_per_token, peak_flops, read_metrics
from llmjax.models import param_count
from llmjax.train import reference_cache, report
from llmjax.train.evaluate import data_iterator, evaluate, evaluate_run  # noqa: F401 (API)
from llmjax.train.experiment import Experiment, build
from llmjax.train.guard import NonFiniteGuard
from llmjax.train.preflight import check_inputs, check_writable
from llmjax.train.resume import finished_step, restore_or_init
from llmjax.train.signals import StartupInterrupted, StopSignals

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    state: Any
    step: int
    train_metrics: dict
    eval_metrics: dict
    run_dir: Path
    # 0 finished; 75 (SIGTERM) / 130 (Ctrl-C): stopped, resumable (llmjax/train/signals.py)
    exit_code: int = 0
    resumed_from: Optional[int] = None  # checkpoint step the run continued from
    checkpoint_step: Optional[int] = None  # last checkpoint written
    init_report: Any = None  # llmjax.train.init_from.InitReport when train.init_from was used


def train(config: Config, devices=None, progress: Optional[bool] = None,
          on_step: Optional[Callable[[int], None]] = None) -> RunResult:
    """Run `config` to train.steps, resuming from run_dir's latest checkpoint if there is one.

    `on_step(step)` is called on the host after each step is dispatched (tests, hooks).
    Signals (llmjax/train/signals.py) are handled from the first line: SIGTERM or Ctrl-C
    during start-up returns exit code 75 / 130 at once; in the loop they checkpoint first.
    """
    cfg = config
    remote = paths.is_remote(paths.check(cfg.train.run_dir, "train.run_dir"))  # `gs:/b`: one line
    run_dir = (paths.resolve(cfg.train.run_dir, "train.run_dir") if remote
               else Path(cfg.train.run_dir).expanduser())  # never pathlib on gs:// (it drops a slash)
    wall_start = time.perf_counter()
    with StopSignals() as signals:
        try:
            check_writable(run_dir)
            check_inputs(cfg)
            ckpt = TrainCheckpoints(run_dir, cfg)
            try:
                done = finished_step(cfg, ckpt)
                if done is not None:  # nothing to train, nothing to write
                    step, ev = done
                    return RunResult(None, step, {}, ev, run_dir, resumed_from=step,
                                     checkpoint_step=step)
                exp = build(cfg, devices)
                return _train(cfg, exp, ckpt, run_dir, progress, on_step, signals, wall_start)
            finally:
                ckpt.close()
        except StartupInterrupted:
            log.warning("%s during start-up: stopped before the first step (nothing to save, "
                        "nothing lost); exit code %d; rerun the same command to start again",
                        signals.name, signals.exit_code)
            return RunResult(None, 0, {}, {}, run_dir, exit_code=signals.exit_code)


def _train(cfg: Config, exp: Experiment, ckpt: TrainCheckpoints, run_dir: Path,
           progress: Optional[bool], on_step, signals: StopSignals, wall_start: float
           ) -> RunResult:
    state_sh = exp.state_shardings()
    state, data_state, resumed, init_report = restore_or_init(cfg, exp, ckpt, state_sh)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    start = int(jax.device_get(state.step))
    n_params = param_count({"params": state.params, "frozen": state.frozen})
    log.info("model %s: %s parameters, mesh %s", exp.model_config.family, f"{n_params:,}",
             dict(exp.mesh.shape))
    if jax.process_index() == 0 and (cfg.peft.method != "full" or cfg.train.init_from):
        print(peft.summary(state.params, state.frozen, state.opt_state, method=cfg.peft.method))

    reference_cache.prepare(exp, state, run_dir, resumed is not None,
                            cfg.train.progress if progress is None else progress)
    train_it = data_iterator(exp, "train")
    if data_state is not None:
        try:
            train_it.set_state(data_state)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.step_dir(resumed)}/data: {err}") from None
    keys = list(train_it.output_shapes())
    batch_sh = parallel.batch_sharding(exp.mesh)
    eval_fn = exp.eval_step(keys, state_sh)
    batches = prefetch_to_device(train_it, batch_sh)
    # Rows past the resumed step (or all rows of a fresh run) came from a killed attempt.
    writer = MetricsWriter(run_dir, cfg.train.tensorboard, start_step=resumed or 0)
    guard = NonFiniteGuard(cfg.train.nonfinite)

    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    flops = flops_per_token(exp.model_config, n_params, cfg.train.seq_len) * tokens_per_step
    peak = peak_flops()
    show = cfg.train.progress if progress is None else progress
    train_metrics: dict = {}
    eval_metrics: dict = {}
    every, minutes = cfg.checkpoint.every, cfg.checkpoint.every_minutes
    exit_code = 0
    saved_step = resumed
    bar = None
    loop_seconds = 0.0

    def save(step: int, evaluated=None) -> None:
        nonlocal saved_step
        bad = guard.check()  # a save is a sync point anyway
        if bad and guard.mode == "stop":
            writer.write(step, {**_read(metrics), "nonfinite_steps": len(bad)})  # on record
            raise guard.error(bad, saved_step, ckpt.step_dir(saved_step) if saved_step else None)
        if not guard.params_finite(state.params):
            raise guard.error([step], saved_step, ckpt.step_dir(saved_step) if saved_step
                              else None)
        ckpt.save(step, state, batches.get_state(), exp.mesh, evaluated)
        writer.flush()  # metrics on object storage: a chunk per checkpoint at least
        saved_step = step

    try:
        first = next(batches)
        step_fn = _compile(exp, keys, state_sh, state, first)
        bar = _progress(show, cfg.train.steps, start)
        signals.started()
        last_time, last_step = time.perf_counter(), start
        loop_start = last_save = last_time
        for step in range(start, cfg.train.steps):
            state, metrics = step_fn(state, first if step == start else next(batches))
            guard.add(step + 1, metrics["nonfinite"])
            done = step + 1
            readback = done % cfg.train.log_every == 0 or done == cfg.train.steps
            if readback:
                train_metrics = _read(metrics)
                bad = guard.check()
                now = time.perf_counter()
                seconds = (now - last_time) / max(done - last_step, 1)
                last_time, last_step = now, done
                train_metrics["tokens_per_second"] = tokens_per_step / seconds
                train_metrics["perplexity"] = math.exp(min(train_metrics["loss"], 50.0)) \
                    if math.isfinite(train_metrics["loss"]) else math.nan
                train_metrics["flops_per_second"] = flops / seconds
                if peak:
                    train_metrics["mfu"] = flops / seconds / peak
                if bad:
                    train_metrics["nonfinite_steps"] = len(bad)
                writer.write(done, train_metrics)
                if bad and guard.mode == "stop":
                    raise guard.error(bad, saved_step,
                                      ckpt.step_dir(saved_step) if saved_step else None)
                if bad:
                    log.warning("steps %s: loss or gradient not finite, update skipped "
                                "(train.nonfinite=skip; %d skipped so far)", _few(bad),
                                guard.skipped)
                # The bar advances here, where the steps are known to be done: advanced
                # per dispatch it would run ahead of the device and stall at read-backs.
                if bar is not None:
                    bar.set_postfix(loss=f"{train_metrics['loss']:.3f}",
                                    lr=f"{train_metrics['learning_rate']:.2e}",
                                    tok_s=f"{train_metrics['tokens_per_second']:,.0f}",
                                    refresh=False)
                    bar.update(done - bar.n)
                elif jax.process_index() == 0:
                    log.info("%s", report.interval_line(done, cfg.train.steps, train_metrics,
                                                        now - wall_start))
            if on_step is not None:
                on_step(done)
            ckpt.check_background_save()  # a failed background save stops the run here
            if done == cfg.train.steps:
                break
            preempted = signals.reached(done)
            periodic = bool(every) and done % every == 0
            if readback and minutes and not periodic:
                periodic = _time_due(time.perf_counter() - last_save >= minutes * 60)
            evaluated = None
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 or (
                    periodic and cfg.checkpoint.keep_best):
                evaluated = eval_metrics = evaluate(exp, state, eval_fn, batch_sh,
                                                    cfg.train.eval_steps)
                writer.write(done, eval_metrics, "eval")
            if periodic or preempted:
                save(done, evaluated)
                last_save = time.perf_counter()
            if preempted:
                exit_code = signals.exit_code
                ckpt.wait()
                log.warning("stopped at step %d by %s; checkpoint %s written; rerun the same "
                            "command to resume (exit code %d)", done, signals.name,
                            ckpt.step_dir(done), exit_code)
                break
        loop_seconds = time.perf_counter() - loop_start
        if bar is not None:
            bar.close()
            bar = None
        if exit_code == 0:
            final = int(jax.device_get(state.step))
            log.info("final evaluation (%d batches) and checkpoint of step %d ...",
                     cfg.train.eval_steps, final)
            eval_metrics = evaluate(exp, state, eval_fn, batch_sh, cfg.train.eval_steps)
            writer.write(final, eval_metrics, "eval")
            if saved_step != final:
                save(final, eval_metrics)
            ckpt.wait()
            if cfg.peft.method != "full":  # small adapter-only export beside the checkpoints
                peft.save_adapter(run_dir / "adapter", state.params, cfg.peft,
                                  exp.model_config, base=ckpt.base or cfg.train.init_from,
                                  frozen=state.frozen,
                                  force=True)  # a run trained further replaces its adapter
    finally:
        if bar is not None:
            bar.close()
        batches.close()
        writer.close()
    step_now = int(jax.device_get(state.step))
    if jax.process_index() == 0:
        curves = _plot(run_dir) if cfg.train.plot else None
        evals = [r["loss"] for r in read_metrics(writer.path)
                 if r.get("split") == "eval" and math.isfinite(r.get("loss", math.nan))]
        log.info("%s", report.summary(
            wall=time.perf_counter() - wall_start, steps=step_now - start,
            tokens=(step_now - start) * tokens_per_step, loop_seconds=loop_seconds,
            final_eval=eval_metrics.get("loss") if eval_metrics else None,
            best_eval=min(evals) if evals else None,
            checkpoint=ckpt.step_dir(saved_step) if saved_step is not None else None,
            adapter=run_dir / "adapter" if cfg.peft.method != "full" and exit_code == 0 else None,
            plot=curves,
            run_dir=run_dir, finished=exit_code == 0,
            stopped_by=signals.name if exit_code else ""))
    return RunResult(state, step_now, train_metrics, eval_metrics, run_dir,
                     exit_code=exit_code, resumed_from=resumed, checkpoint_step=saved_step,
                     init_report=init_report)


def _plot(run_dir: Path) -> Optional[Path]:
    """run_dir/curves.png, or None with a one-line warning: the run itself is done and saved,
    so a plotting problem (no matplotlib, a full disk) must not fail it."""
    from llmjax.plot import plot_runs
    try:
        return plot_runs([run_dir])
    except Exception as err:  # noqa: BLE001
        from llmjax.errors import user_message
        why = " ".join((user_message(err) or f"{type(err).__name__}: {err}").split())
        log.warning("could not write the training curves (train.plot=false turns them off): "
                    "%s", why)
        return None


def _read(metrics: dict) -> dict:
    out = {k: float(v) for k, v in jax.device_get(metrics).items()}
    out.pop("nonfinite", None)  # per-step flag: reported as nonfinite_steps per interval
    return out


def _few(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:5])) + (f", ... ({len(steps)} in all)" if len(steps) > 5
                                              else "")


def _compile(exp: Experiment, keys, state_sh, state, batch):
    """Compile the train step ahead of the loop (timed and reported on its own line, so the
    first measured interval holds no compile time)."""
    step_fn = exp.train_step(keys, state_sh)
    if jax.process_index() == 0:
        log.info("compiling the train step ...")
    begin = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    if jax.process_index() == 0:
        log.info("%s", report.compile_line(compiled, time.perf_counter() - begin))
    return compiled


def _time_due(due: bool) -> bool:
    """Checkpoint-by-time decision, identical on every process: process 0's clock decides
    (one broadcast, only at log intervals of multi-process runs)."""
    if jax.process_count() == 1:
        return due
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(due)))


def _progress(show: bool, total: int, initial: int):
    """A tqdm bar on a terminal; None (log lines per interval instead) otherwise."""
    if not show or jax.process_index() != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
