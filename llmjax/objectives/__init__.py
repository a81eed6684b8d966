"""Objective registry: `build(cfg.objective, cfg.model, special)` -> an Objective."""
from llmjax.objectives import (classification, lm, mlm, nsp, preference,  # noqa: F401 (register)
                               seq2seq)
from llmjax.objectives.base import (MODEL_INPUTS, ChunkedLogits, Composite, Objective, Term,
                                    build, cross_entropy, register, registered)

__all__ = ["MODEL_INPUTS", "ChunkedLogits", "Composite", "Objective", "Term", "build",
           "cross_entropy", "register", "registered"]
