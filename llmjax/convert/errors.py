"""Re-export: ConversionError is defined in llmjax.errors with the other user errors."""
from __future__ import annotations

from llmjax.errors import ConversionError

__all__ = ["ConversionError"]
