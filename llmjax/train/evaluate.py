"""Validation: the data iterators of a run and the mean eval metrics of a state or of a
run directory's checkpoint (`llmjax eval`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from llmjax import parallel
from llmjax.checkpoint import TrainCheckpoints
from llmjax.config import Config
from llmjax.data.device import to_global
from llmjax.data.pipeline import make_iterator
from llmjax.train.experiment import Experiment, build
from llmjax.train.preflight import check_inputs
from llmjax.train.resume import restore_state


def data_iterator(exp: Experiment, split: str, num_epochs: Optional[int] = None,
                  reference: bool = True):
    """The batches of `split`; with objective.reference=cached (and `reference`) they carry
    the cached reference log-probs (llmjax/train/reference_cache.py)."""
    cfg = exp.config
    target_len = None
    if exp.objective.batch_kind == "seq2seq" and cfg.objective.target_length:
        target_len = cfg.objective.target_length
    it = make_iterator(cfg.data, exp.objective.batch_kind, cfg.train.seq_len,
                       cfg.train.batch_size, split, num_epochs=num_epochs,
                       target_len=target_len, vocab_size=exp.model_config.vocab_size)
    if reference and getattr(exp.objective, "cached_reference", False):
        from llmjax.train import reference_cache
        it.attach(reference_cache.values_for(exp, split))
    return it


def evaluate(exp: Experiment, state, eval_fn, sharding, num_batches: int) -> dict[str, float]:
    """Mean loss/accuracy per term over `num_batches` validation batches (same batches each time)."""
    it = data_iterator(exp, "validation")
    sums: dict[str, np.ndarray] = {}
    try:
        for _ in range(num_batches):
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
        if not name.startswith("router_"):  # MoE router losses have no accuracy
            metrics[f"{name}_accuracy"] = correct / max(count, 1)
    weights = exp.objective.term_weights
    metrics["loss"] = sum(weights[n] * metrics[f"{n}_loss"] for n in sums)
    if sums:
        first = next(iter(sums))
        metrics["perplexity"] = math.exp(min(metrics[f"{first}_loss"], 50.0))
    return metrics


def evaluate_run(config: Config, devices=None, step: Optional[int] = None) -> dict[str, float]:
    """Validation metrics of the latest (or `step`) checkpoint of config's run_dir."""
    cfg = config
    run_dir = Path(cfg.train.run_dir).expanduser()
    check_inputs(cfg)
    exp = build(cfg, devices)
    ckpt = TrainCheckpoints(run_dir, cfg, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{ckpt.directory} holds no checkpoint to evaluate; train "
                                    f"first or set train.run_dir to a run directory")
        state_sh = exp.state_shardings()
        state, _, _ = restore_state(ckpt, step, exp, shardings=state_sh)
    finally:
        ckpt.close()
    it = data_iterator(exp, "validation")
    keys = list(it.output_shapes())
    it.close()
    eval_fn = exp.eval_step(keys, state_sh)
    metrics = evaluate(exp, state, eval_fn, parallel.batch_sharding(exp.mesh), cfg.train.eval_steps)
    return {"step": float(step), **metrics}
