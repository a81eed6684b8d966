"""lm-evaluation-harness backend: `LlmjaxLM` (an `lm_eval.api.model.LM`) over any model
`from_pretrained` loads or a path to one, and `evaluate_tasks`, which runs named or local
YAML tasks. The model-level pieces live in `llmjax.evaluation.lm` (below the trainer, which
scores `eval.tasks` with them); this module adds loading by path.

Needs the optional extra: `pip install 'llmjax[eval]'` (lm_eval from PyPI).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from llmjax.evaluation.lm import (ModelLM, evaluate_loaded, evaluate_tasks,  # noqa: F401 (API)
                                  format_results, load_tasks, plain_results)
from llmjax.evaluation.task_files import BUNDLED_TASKS, bundled_tasks, load_task  # noqa: F401
from llmjax.parallel import DEFAULT_RULES


class LlmjaxLM(ModelLM):
    """`ModelLM` whose `model` may also be a path (training run, llmjax export, HF directory,
    GGUF), loaded with `from_pretrained(model, **load_overrides)`."""

    def __init__(self, model: Any, batch_rows: int = 8, mesh: Any = None,
                 max_gen_toks: int = 256, rules: Sequence = DEFAULT_RULES,
                 **load_overrides: Any):
        if isinstance(model, (str, os.PathLike)):
            from llmjax.pretrained import from_pretrained

            model = from_pretrained(model, **load_overrides)
        super().__init__(model, batch_rows=batch_rows, mesh=mesh, max_gen_toks=max_gen_toks,
                         rules=rules)
