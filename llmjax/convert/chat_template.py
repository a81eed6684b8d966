"""Re-export: chat templates are rendered by llmjax.data.chat_template (tokenizers use them)."""
from __future__ import annotations

from llmjax.data.chat_template import MAX_POWER_BITS, MAX_REPEAT, render_chat_template

__all__ = ["MAX_POWER_BITS", "MAX_REPEAT", "render_chat_template"]
