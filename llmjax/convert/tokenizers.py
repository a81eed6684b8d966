"""Re-export: the tokenizers of imported models live in llmjax.data.tokenizer (the one
tokenizer loader, which convert/ uses)."""
from __future__ import annotations

from llmjax.data.tokenizer import (GUESSES, ROLES, HFTokenizer, SentencePieceModelTokenizer,
                                   SpecialIds, load_any_tokenizer)

__all__ = ["GUESSES", "ROLES", "HFTokenizer", "SentencePieceModelTokenizer", "SpecialIds",
           "load_any_tokenizer"]
