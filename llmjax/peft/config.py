"""The `peft:` config section: defined in llmjax/config.py with the other sections (the config
layer imports nothing but llmjax.errors); re-exported here, its historical home."""
from __future__ import annotations

from llmjax.config import PeftConfig

__all__ = ["PeftConfig"]
