"""The model's kernels, apart from the model: each op (dense, tied-head logits, norm,
activation, attention) has one reference implementation (reference.py) and backend versions
with the same signature beside it: the CPU custom-VJP ops (cpu.py) and blockwise attention
(blockwise.py), cuDNN (cudnn.py) and Pallas splash (splash.py) attention. select.py is the
one place that picks them from the config; layers call what it returns."""
from llmjax.models.ops.select import (KERNELS, Kernels, attention_op, kernels,
                                      resolve_attention, resolve_kernels)

__all__ = ["KERNELS", "Kernels", "attention_op", "kernels", "resolve_attention",
           "resolve_kernels"]
