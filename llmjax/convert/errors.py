"""The one error type of conversion: names the tensor or config field at fault."""
from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint or config cannot be converted (unknown architecture, missing tensor,
    shape mismatch, unsupported config field)."""
