"""The model's kernels, apart from the model: each op (dense, tied-head logits, norm,
activation, attention) has one reference implementation (reference.py) and backend versions
with the same signature beside it: the CPU custom-VJP ops (cpu.py) and blockwise attention
(blockwise.py), cuDNN (cudnn.py), Pallas splash (splash.py) and context-parallel (context_parallel.py)
attention. select.py is the
one place that picks them from the config; layers call what it returns."""
from llmjax.models.ops.select import (KERNELS, Kernels, SequenceSplit, attention_op,
                                      context_shards, kernels, resolve_attention,
                                      resolve_kernels, sequence_split)

__all__ = ["KERNELS", "Kernels", "SequenceSplit", "attention_op", "context_shards", "kernels",
           "resolve_attention", "resolve_kernels", "sequence_split"]
