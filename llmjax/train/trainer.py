"""The training loop: data -> step -> metrics -> eval -> checkpoint.

The host only feeds token ids (prefetched onto the mesh) and dispatches the
jitted step; it reads metrics back only every `train.log_every` steps, so the
device never waits on the host in between.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import yaml

from llmjax import parallel
from llmjax.config import Config
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


def train(config: Config, devices=None, progress: Optional[bool] = None) -> RunResult:
    """Run `config` to train.steps; returns the final state and metrics."""
    cfg = config
    run_dir = Path(cfg.train.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    exp = build(cfg, devices)
    state_sh = exp.state_shardings()
    state = exp.init_state()
    start = int(jax.device_get(state.step))
    n_params = param_count({"params": state.params, "frozen": state.frozen})
    log.info("model %s: %s parameters, mesh %s", exp.model_config.family, f"{n_params:,}",
             dict(exp.mesh.shape))

    train_it = data_iterator(exp, "train")
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
    last_time, last_step = time.perf_counter(), start
    try:
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
                if bar is not None:
                    bar.set_postfix(loss=f"{train_metrics['loss']:.3f}",
                                    lr=f"{train_metrics['learning_rate']:.2e}",
                                    tok_s=f"{train_metrics['tokens_per_second']:,.0f}")
            if bar is not None:
                bar.update(1)
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.steps:
                eval_metrics = evaluate(exp, state, eval_fn, batch_sh, cfg.train.eval_steps)
                writer.write(done, eval_metrics, "eval")
        eval_metrics = evaluate(exp, state, eval_fn, batch_sh, cfg.train.eval_steps)
        writer.write(cfg.train.steps, eval_metrics, "eval")
    finally:
        if bar is not None:
            bar.close()
        batches.close()
        writer.close()
    return RunResult(state, int(jax.device_get(state.step)), train_metrics, eval_metrics, run_dir)


def _progress(show: bool, total: int, initial: int):
    if not show or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
