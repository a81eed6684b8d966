"""The one error type of conversion: names the tensor or config field at fault."""
from __future__ import annotations

from llmjax.config import ConfigError


class ConversionError(ConfigError):
    """A checkpoint or config cannot be converted (unknown architecture, missing tensor,
    shape mismatch, unsupported config field).

    A ConfigError (and so a ValueError) subclass: the CLI reports it as a one-line error."""
