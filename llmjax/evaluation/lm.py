"""lm-evaluation-harness over a loaded llmjax model: `ModelLM` (an `lm_eval.api.model.LM`)
and the task runners. `llmjax.evaluation.harness.LlmjaxLM` adds loading from a path; the
trainer scores `eval.tasks` with them (llmjax/train/task_eval.py).

Needs the optional extra: `pip install 'llmjax[eval]'` (lm_eval from PyPI). Text is
tokenised as lm-eval's own HF backend does it: the continuation's ids are the ids of
context + continuation after the context's ids, so merges across the boundary count toward
the continuation, and trailing spaces of the context move to the continuation.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from llmjax.errors import ConfigError

try:
    from lm_eval.api.model import LM
except ImportError as exc:  # the CLI turns this into one line naming the extra
    raise ImportError("lm-evaluation-harness is not installed: pip install 'llmjax[eval]' "
                      "(or pip install lm_eval)") from exc

from llmjax.evaluation.scoring import Scorer
from llmjax.evaluation.task_files import load_task
from llmjax.generate import generate
from llmjax.parallel import DEFAULT_RULES


class ModelLM(LM):
    """Scores and generates with a loaded model: anything with `config`, `params`,
    `tokenizer` and `source` (a PretrainedModel, or a training run's state). `batch_rows`
    packed rows per scoring pass; `mesh` (with the logical `rules`) shards scoring and
    decoding (rows over data*fsdp, heads over tensor). `set_params` swaps the weights and
    keeps the compiled programs (evaluation during training)."""

    def __init__(self, model: Any, batch_rows: int = 8, mesh: Any = None,
                 max_gen_toks: int = 256, rules: Sequence = DEFAULT_RULES):
        super().__init__()
        if model.tokenizer is None:
            raise ConfigError(f"{model.source or 'the model'} has no tokenizer; lm-eval tasks "
                              f"are text (set data.tokenizer in the run's config, or save the "
                              f"model with its tokenizer)")
        self.model, self.tokenizer, self.mesh = model, model.tokenizer, mesh
        self.batch_rows, self.max_gen_toks = batch_rows, max_gen_toks
        self.rules = tuple(rules)
        self.params = model.params
        self.scorer = Scorer(model.config, model.params, mesh=mesh, rules=rules,
                             batch_rows=batch_rows)
        special = self.tokenizer.special_ids
        self.eos_id = special.get("eos")
        bos = special.get("bos")
        self.prefix_id = bos if bos is not None else self.eos_id

    def set_params(self, params: Any) -> None:
        """Score and generate with `params` (same config) from now on."""
        self.params = params
        self.scorer.set_params(params)

    # -- tokenisation -------------------------------------------------------------------------
    def _prefix(self) -> list[int]:
        if self.prefix_id is None:
            raise ConfigError("an empty context needs a BOS or EOS id to start from; this "
                              "tokenizer has neither")
        return [int(self.prefix_id)]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return self._prefix(), self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return whole[:len(ctx)], whole[len(ctx):]

    # -- the LM interface ---------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        return [(s.logprob, s.is_greedy) for s in self.scorer.loglikelihood(pairs)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        docs = [self.tokenizer.encode(r.args[0]) for r in requests]
        for i, doc in enumerate(docs):
            if not doc:
                raise ConfigError(f"request {i}: empty document; there is nothing to score")
        return self.scorer.loglikelihood_rolling(docs, self._prefix()[0])

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, per gen_kwargs) continuations cut at the first stop string;
        requests with the same settings are decoded together, batch_rows at a time."""
        cfg = self.model.config
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if kwargs.pop("do_sample", False) is False:
                temperature = 0.0
            key = (budget, temperature)
            settings.append((context, until))
            groups.setdefault(key, []).append(i)
        out: list[Optional[str]] = [None] * len(requests)
        for (budget, temperature), members in groups.items():
            budget = min(budget, cfg.max_len - 1)
            for start in range(0, len(members), self.batch_rows):
                chunk = members[start:start + self.batch_rows]
                prompts = [(self.tokenizer.encode(settings[i][0]) or self._prefix())
                           [-(cfg.max_len - budget):] for i in chunk]
                ids = generate(cfg, self.params, prompts, max_new_tokens=budget,
                               temperature=temperature, eos_id=self.eos_id, mesh=self.mesh,
                               rules=self.rules)
                for i, new in zip(chunk, ids):
                    out[i] = _cut(self.tokenizer.decode(new), settings[i][1])
        return out  # type: ignore[return-value]


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest stop string."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[:min(ends)] if ends else text


# -- tasks ------------------------------------------------------------------------------------

def load_tasks(tasks: Sequence[Any], registry: bool = True) -> dict:
    """lm-eval's loaded task dict for task specs (see `task_files.load_task`) or configs:
    data read once, reusable for every evaluation (`evaluate_loaded`)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    tasks = [t if isinstance(t, dict) else load_task(t, registry) for t in tasks]
    # Indexing lm-eval's ~13,000 built-in task files takes minutes on a small machine: only
    # when a task is named rather than given as a config.
    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))
    return manager.load(tasks)


def evaluate_tasks(lm: ModelLM, tasks: Sequence[Any], limit: Optional[int] = None,
                   num_fewshot: Optional[int] = None) -> dict:
    """lm-eval's results dict for `tasks` (see `task_files.load_task`), offline for local
    tasks."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = [t if isinstance(t, dict) else load_task(t) for t in tasks]
    registry = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                           log_samples=False, bootstrap_iters=0, task_manager=registry,
                           torch_random_seed=None)  # nothing of ours runs in torch


def evaluate_loaded(lm: ModelLM, loaded: dict, limit: Optional[int] = None) -> dict:
    """lm-eval's results dict for tasks from `load_tasks` (zero-shot unless a task's YAML
    sets num_fewshot; the few-shot sampler seeded as simple_evaluate seeds it)."""
    from lm_eval.evaluator import evaluate

    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    return evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0,
                    log_samples=False)


def plain_results(results: dict) -> dict:
    """Task -> metric -> value (numbers only), for printing and JSON."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not k.split(",")[0].endswith("_stderr")}
    return out


def format_results(results: dict) -> str:
    """A markdown table: task, metric, value."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in plain_results(results).items():
        lines += [f"| {task} | {name} | {value:.4f} |" for name, value in metrics.items()]
    return "\n".join(lines)
