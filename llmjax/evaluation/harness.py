"""lm-evaluation-harness backend: `LlmjaxLM` (an `lm_eval.api.model.LM`) over any model
`from_pretrained` loads, and `evaluate_tasks`, which runs named or local YAML tasks.

Needs the optional extra: `pip install 'llmjax[eval]'` (lm_eval from PyPI). Text is
tokenised as lm-eval's own HF backend does it: the continuation's ids are the ids of
context + continuation after the context's ids, so merges across the boundary count toward
the continuation, and trailing spaces of the context move to the continuation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from llmjax.errors import ConfigError, MissingInputError

try:
    from lm_eval.api.model import LM
except ImportError as exc:  # the CLI turns this into one line naming the extra
    raise ImportError("lm-evaluation-harness is not installed: pip install 'llmjax[eval]' "
                      "(or pip install lm_eval)") from exc

from llmjax.evaluation.scoring import Scorer
from llmjax.generate import generate

BUNDLED_TASKS = Path(__file__).parent / "tasks"


class LlmjaxLM(LM):
    """Scores and generates with an llmjax model; `model` is a PretrainedModel or a path
    (training run, llmjax export, HF directory, GGUF). `batch_rows` packed rows per scoring
    pass; `mesh` shards scoring and decoding (rows over data*fsdp, heads over tensor)."""

    def __init__(self, model: Any, batch_rows: int = 8, mesh: Any = None,
                 max_gen_toks: int = 256, **load_overrides: Any):
        super().__init__()
        if isinstance(model, (str, os.PathLike)):
            from llmjax.pretrained import from_pretrained

            model = from_pretrained(model, **load_overrides)
        if model.tokenizer is None:
            raise ConfigError(f"{model.source or 'the model'} has no tokenizer; lm-eval tasks "
                              f"are text (set data.tokenizer in the run's config, or save the "
                              f"model with its tokenizer)")
        self.model, self.tokenizer, self.mesh = model, model.tokenizer, mesh
        self.batch_rows, self.max_gen_toks = batch_rows, max_gen_toks
        self.scorer = Scorer(model.config, model.params, mesh=mesh, batch_rows=batch_rows)
        special = self.tokenizer.special_ids
        self.eos_id = special.get("eos")
        bos = special.get("bos")
        self.prefix_id = bos if bos is not None else self.eos_id

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
                ids = generate(cfg, self.model.params, prompts, max_new_tokens=budget,
                               temperature=temperature, eos_id=self.eos_id, mesh=self.mesh)
                for i, new in zip(chunk, ids):
                    out[i] = _cut(self.tokenizer.decode(new), settings[i][1])
        return out  # type: ignore[return-value]


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest stop string."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[:min(ends)] if ends else text


# -- tasks ------------------------------------------------------------------------------------

def load_task(spec: str) -> Any:
    """A task for lm-eval: a YAML file (local data_files resolved next to it and checked),
    the name of a bundled task, or any other name (lm-eval's own registry)."""
    import yaml

    path = Path(spec)
    if not path.suffix and (BUNDLED_TASKS / f"{spec}.yaml").exists():
        path = BUNDLED_TASKS / f"{spec}.yaml"
    if path.suffix not in (".yaml", ".yml"):
        return spec
    if not path.exists():
        raise MissingInputError(f"task file {path} does not exist; pass a task YAML file, a "
                                f"bundled task ({', '.join(bundled_tasks())}) or an lm-eval "
                                f"task name")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or "task" not in config:
        raise ConfigError(f"{path}: not an lm-eval task config (a mapping with a `task:` name)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        resolved = {}
        for split, name in (files.items() if isinstance(files, dict) else [("train", files)]):
            local = (path.parent / name) if not Path(name).is_absolute() else Path(name)
            if not local.exists():
                raise MissingInputError(f"task {config['task']} ({path}) names data file "
                                        f"{name} for split {split!r}, which does not exist "
                                        f"(looked for {local})")
            resolved[split] = str(local)
        config["dataset_kwargs"] = dict(config["dataset_kwargs"], data_files=resolved)
    return config


def bundled_tasks() -> list[str]:
    return sorted(p.stem for p in BUNDLED_TASKS.glob("*.yaml"))


def evaluate_tasks(lm: LlmjaxLM, tasks: Sequence[Any], limit: Optional[int] = None,
                   num_fewshot: Optional[int] = None) -> dict:
    """lm-eval's results dict for `tasks` (see `load_task`), offline for local tasks."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = [t if isinstance(t, dict) else load_task(t) for t in tasks]
    # Indexing lm-eval's ~13,000 built-in task files takes minutes on a small machine: only
    # when a task is named rather than given as a config.
    registry = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                           log_samples=False, bootstrap_iters=0, task_manager=registry,
                           torch_random_seed=None)  # nothing of ours runs in torch


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
