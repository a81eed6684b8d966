"""The training loop: data -> step -> metrics -> eval -> checkpoint.

The host only feeds token ids (prefetched onto the mesh) and dispatches the
jitted step; it reads metrics back only every `train.log_every` steps, so the
device never waits on the host in between.

Checkpoints (llmjax/checkpoint.py): a run directory with checkpoints resumes
from the latest one exactly (train state, PRNG, data iterator position); a
checkpoint that cannot be restored is an error, never a silent fresh start.
Saves are asynchronous every `checkpoint.every` steps and at the end; SIGTERM
saves at the next step boundary and returns exit code EXIT_PREEMPTED (75).
`train.init_from` (fine-tuning) loads parameters only into a fresh state.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import yaml

from llmjax import parallel, peft
from llmjax.checkpoint import EXIT_PREEMPTED, CheckpointError, PreemptionWatcher, TrainCheckpoints
from llmjax.checkpoint import init_from as load_init_from
from llmjax.config import Config, ConfigError
from llmjax.data.device import prefetch_to_device
from llmjax.data.pipeline import make_iterator
from llmjax.metrics import MetricsWriter, flops_per_token, peak_flops
from llmjax.models import param_count
from llmjax.train.experiment import Experiment, build

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    state: Any
    step: int
    train_metrics: dict
    eval_metrics: dict
    run_dir: Path
    exit_code: int = 0  # 0 finished; EXIT_PREEMPTED (75) stopped by SIGTERM after checkpointing
    resumed_from: Optional[int] = None  # checkpoint step the run continued from
    checkpoint_step: Optional[int] = None  # last checkpoint written
    init_report: Any = None  # llmjax.checkpoint.InitReport when train.init_from was used


def data_iterator(exp: Experiment, split: str, num_epochs: Optional[int] = None):
    cfg = exp.config
    target_len = None
    if exp.objective.batch_kind == "seq2seq" and cfg.objective.target_length:
        target_len = cfg.objective.target_length
    return make_iterator(cfg.data, exp.objective.batch_kind, cfg.train.seq_len,
                         cfg.train.batch_size, split, num_epochs=num_epochs,
                         target_len=target_len, vocab_size=exp.model_config.vocab_size)


def evaluate(exp: Experiment, state, eval_fn, sharding, num_batches: int) -> dict[str, float]:
    """Mean loss/accuracy per term over `num_batches` validation batches (same batches each time)."""
    it = data_iterator(exp, "validation")
    sums: dict[str, np.ndarray] = {}
    try:
        for _ in range(num_batches):
            from llmjax.data.device import to_global
            out = jax.device_get(eval_fn(state, to_global(next(it), sharding)))
            for name, term in out.items():
                sums[name] = sums.get(name, 0) + np.asarray(term, np.float64)
    except StopIteration:
        pass
    finally:
        it.close()
    metrics = {}
    for name, (loss_sum, count, correct) in sums.items():
        metrics[f"{name}_loss"] = loss_sum / max(count, 1)
        metrics[f"{name}_accuracy"] = correct / max(count, 1)
    weights = exp.objective.term_weights
    metrics["loss"] = sum(weights[n] * metrics[f"{n}_loss"] for n in sums)
    if sums:
        first = next(iter(sums))
        metrics["perplexity"] = math.exp(min(metrics[f"{first}_loss"], 50.0))
    return metrics


def train(config: Config, devices=None, progress: Optional[bool] = None,
          on_step: Optional[Callable[[int], None]] = None) -> RunResult:
    """Run `config` to train.steps, resuming from run_dir's latest checkpoint if there is one.

    `on_step(step)` is called on the host after each step is dispatched (tests, hooks).
    """
    cfg = config
    run_dir = Path(cfg.train.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    exp = build(cfg, devices)
    ckpt = TrainCheckpoints(run_dir, cfg)
    try:
        return _train(cfg, exp, ckpt, run_dir, progress, on_step)
    finally:
        ckpt.close()


def _restore_or_init(cfg: Config, exp: Experiment, ckpt: TrainCheckpoints, state_sh):
    """(state, data state or None, resumed step or None, init report or None)."""
    latest = ckpt.latest_step()
    if latest is not None:
        if not cfg.checkpoint.resume:
            raise ConfigError(f"{ckpt.directory} holds checkpoints {ckpt.all_steps()} but "
                              f"checkpoint.resume=false: choose a new train.run_dir, or delete "
                              f"them to start afresh")
        state, data_state, _ = ckpt.restore(latest, exp, shardings=state_sh)
        if int(jax.device_get(state.step)) != latest:
            raise CheckpointError(f"{ckpt.step_dir(latest)} holds step "
                                  f"{int(jax.device_get(state.step))}, not {latest}")
        log.info("resumed from %s (step %d)", ckpt.step_dir(latest), latest)
        return state, data_state, latest, None
    if cfg.train.init_from:
        state, report = load_init_from(exp, cfg.train.init_from)
        if jax.process_index() == 0:
            log.info("%s", report.summary())
        # Checkpoints reference the frozen base instead of storing it (llmjax/peft/base_ref.py).
        from llmjax.peft.base_ref import reference
        ckpt.base = reference(cfg.train.init_from, state.frozen, report)
        return state, None, None, report
    return exp.init_state(), None, None, None


def _trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl lines past `step` (written by a run killed after its last checkpoint)."""
    path = run_dir / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    import json
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut by a kill
            continue
    path.write_text("".join(line + "\n" for line in kept))


def _train(cfg: Config, exp: Experiment, ckpt: TrainCheckpoints, run_dir: Path,
           progress: Optional[bool], on_step) -> RunResult:
    state_sh = exp.state_shardings()
    state, data_state, resumed, report = _restore_or_init(cfg, exp, ckpt, state_sh)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if resumed is not None:
        _trim_metrics(run_dir, resumed)
    start = int(jax.device_get(state.step))
    n_params = param_count({"params": state.params, "frozen": state.frozen})
    log.info("model %s: %s parameters, mesh %s", exp.model_config.family, f"{n_params:,}",
             dict(exp.mesh.shape))
    if jax.process_index() == 0 and (cfg.peft.method != "full" or cfg.train.init_from):
        print(peft.summary(state.params, state.frozen, state.opt_state, method=cfg.peft.method))

    train_it = data_iterator(exp, "train")
    if data_state is not None:
        try:
            train_it.set_state(data_state)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.step_dir(resumed)}/data: {err}") from None
    keys = list(train_it.output_shapes())
    batch_sh = parallel.batch_sharding(exp.mesh)
    step_fn = exp.train_step(keys, state_sh)
    eval_fn = exp.eval_step(keys, state_sh)
    batches = prefetch_to_device(train_it, batch_sh)
    writer = MetricsWriter(run_dir, cfg.train.tensorboard)

    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    flops = flops_per_token(exp.model_config, n_params, cfg.train.seq_len) * tokens_per_step
    peak = peak_flops()
    show = cfg.train.progress if progress is None else progress
    bar = _progress(show, cfg.train.steps, start)
    train_metrics: dict = {}
    eval_metrics: dict = {}
    every = cfg.checkpoint.every
    exit_code = 0
    saved_step = resumed
    last_time, last_step = time.perf_counter(), start
    try:
        with PreemptionWatcher() as preemption:
            for step in range(start, cfg.train.steps):
                state, metrics = step_fn(state, next(batches))
                done = step + 1
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    train_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    seconds = (now - last_time) / max(done - last_step, 1)
                    last_time, last_step = now, done
                    train_metrics["tokens_per_second"] = tokens_per_step / seconds
                    train_metrics["perplexity"] = math.exp(min(train_metrics["loss"], 50.0))
                    train_metrics["flops_per_second"] = flops / seconds
                    if peak:
                        train_metrics["mfu"] = flops / seconds / peak
                    writer.write(done, train_metrics)
                    # The bar advances here, where the steps are known to be done: advanced
                    # per dispatch it would run ahead of the device and stall at read-backs.
                    if bar is not None:
                        bar.set_postfix(loss=f"{train_metrics['loss']:.3f}",
                                        lr=f"{train_metrics['learning_rate']:.2e}",
                                        tok_s=f"{train_metrics['tokens_per_second']:,.0f}",
                                        refresh=False)
                        bar.update(done - bar.n)
                if on_step is not None:
                    on_step(done)
                if done == cfg.train.steps:
                    break
                preempted = preemption.reached(done)
                periodic = bool(every) and done % every == 0
                evaluated = None
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 or (
                        periodic and cfg.checkpoint.keep_best):
                    evaluated = eval_metrics = evaluate(exp, state, eval_fn, batch_sh,
                                                        cfg.train.eval_steps)
                    writer.write(done, eval_metrics, "eval")
                if periodic or preempted:
                    ckpt.save(done, state, batches.get_state(), exp.mesh, evaluated)
                    saved_step = done
                if preempted:
                    exit_code = EXIT_PREEMPTED
                    ckpt.wait()
                    log.warning("stopped at step %d by SIGTERM; checkpoint %s written; rerun the "
                                "same command to resume", done, ckpt.step_dir(done))
                    break
            if exit_code == 0:
                final = int(jax.device_get(state.step))
                eval_metrics = evaluate(exp, state, eval_fn, batch_sh, cfg.train.eval_steps)
                writer.write(final, eval_metrics, "eval")
                if saved_step != final:
                    ckpt.save(final, state, batches.get_state(), exp.mesh, eval_metrics)
                    saved_step = final
                ckpt.wait()
                if cfg.peft.method != "full":  # small adapter-only export beside the checkpoints
                    peft.save_adapter(run_dir / "adapter", state.params, cfg.peft,
                                      exp.model_config, base=ckpt.base or cfg.train.init_from,
                                      frozen=state.frozen)
    finally:
        if bar is not None:
            bar.close()
        batches.close()
        writer.close()
    return RunResult(state, int(jax.device_get(state.step)), train_metrics, eval_metrics, run_dir,
                     exit_code=exit_code, resumed_from=resumed, checkpoint_step=saved_step,
                     init_report=report)


def evaluate_run(config: Config, devices=None, step: Optional[int] = None) -> dict[str, float]:
    """Validation metrics of the latest (or `step`) checkpoint of config's run_dir."""
    cfg = config
    run_dir = Path(cfg.train.run_dir).expanduser()
    exp = build(cfg, devices)
    ckpt = TrainCheckpoints(run_dir, cfg, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{ckpt.directory} holds no checkpoint to evaluate; train "
                                    f"first or set train.run_dir to a run directory")
        state_sh = exp.state_shardings()
        state, _, _ = ckpt.restore(step, exp, shardings=state_sh)
    finally:
        ckpt.close()
    it = data_iterator(exp, "validation")
    keys = list(it.output_shapes())
    it.close()
    eval_fn = exp.eval_step(keys, state_sh)
    metrics = evaluate(exp, state, eval_fn, parallel.batch_sharding(exp.mesh), cfg.train.eval_steps)
    return {"step": float(step), **metrics}


def _progress(show: bool, total: int, initial: int):
    if not show or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
