"""`eval.tasks` while a run trains: lm-evaluation-harness tasks (bundled or local YAML)
scored on the current weights, their metrics logged as `tasks/<task>/<metric>`.

Tasks and their data load once; the scorer and decoder compile once (on the run's mesh, with
its logical rules) and take each evaluation's weights without recompiling. Every process
runs the same scoring (the batches are global arrays built from the same requests on every
host, the scores come back replicated), so all processes compute the same metrics; only
process 0 writes them (MetricsWriter). Needs lm_eval (the [eval] extra): the config load
refuses eval.tasks without it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from llmjax.config import Config
from llmjax.data.tokenizer import load_tokenizer
from llmjax.train.experiment import Experiment


@dataclasses.dataclass
class _RunModel:
    """What the lm-eval backend reads of a model (a PretrainedModel's fields)."""

    config: Any
    params: Any
    tokenizer: Any
    source: str


class TaskEvaluator:
    """Scores cfg.eval.tasks on a train state: `metrics(state)` -> {tasks/<task>/<metric>: v}."""

    def __init__(self, cfg: Config, exp: Experiment):
        from llmjax.evaluation.lm import load_tasks

        self.cfg, self.exp = cfg, exp
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.loaded = load_tasks(cfg.eval.tasks, registry=False)
        self.lm = None  # built at the first evaluation, around that state's weights
        self._merge = jax.jit(exp.plan.merge)  # trainable + frozen (+ adapters) -> model params

    def due(self, done: int, held_out_due: bool) -> bool:
        """eval.every > 0: every that many steps; 0: with the held-out eval."""
        every = self.cfg.eval.every
        return done % every == 0 if every else held_out_due

    def metrics(self, state) -> dict[str, float]:
        from llmjax.evaluation.lm import ModelLM, evaluate_loaded, plain_results

        with jax.set_mesh(self.exp.mesh), nn.logical_axis_rules(self.exp.rules):
            params = self._merge(state.params, state.frozen)
        if self.lm is None:
            model = _RunModel(self.exp.model_config, params, self.tokenizer,
                              self.cfg.train.run_dir)
            self.lm = ModelLM(model, batch_rows=self.cfg.eval.batch_rows, mesh=self.exp.mesh,
                              max_gen_toks=self.cfg.eval.max_gen_toks, rules=self.exp.rules)
        else:
            self.lm.set_params(params)
        results = evaluate_loaded(self.lm, self.loaded, limit=self.cfg.eval.limit or None)
        return {f"tasks/{task}/{name}": float(value)
                for task, values in plain_results(results).items()
                for name, value in values.items()}
