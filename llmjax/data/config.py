"""The `data:` config section: DataConfig is defined in llmjax/config.py with the other
sections (the config layer imports nothing but llmjax.errors); re-exported here, its
historical home, with the names that go with it."""
from __future__ import annotations

from llmjax.config import DOCUMENT_UNITS, SOURCES, DataConfig, fields_for_kind

__all__ = ["DOCUMENT_UNITS", "SOURCES", "DataConfig", "fields_for_kind"]
