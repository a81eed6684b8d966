"""llmjax: JAX/Flax TPU-first pretraining and fine-tuning of Transformer language models."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["from_pretrained", "__version__"]


def from_pretrained(path, **kwargs):
    """Load an llmjax checkpoint, an HF safetensors directory or a GGUF file (see llmjax.pretrained)."""
    from llmjax.pretrained import from_pretrained as load
    return load(path, **kwargs)
