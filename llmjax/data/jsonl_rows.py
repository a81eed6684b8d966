"""Checked JSONL rows of data.train_files / data.validation_files (chat and preference
sources): random access, and a held-out validation share when no validation files are set."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from llmjax import paths
from llmjax.errors import ConfigError, MissingInputError


class RowSource:
    """Random access to checked rows (dicts)."""

    def __init__(self, rows: Sequence[dict[str, Any]], description: str):
        self.rows, self.description = list(rows), description

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def __repr__(self) -> str:
        return f"RowSource({self.description}, {len(self)} rows)"


def json_lines(path: str, example: str):
    """(where, record) for each non-blank line of one JSONL file; `where` is "file line n".
    A line that is not JSON is a ConfigError showing `example`, the row format expected."""
    raw = paths.resolve(path, check_bucket=False).read_bytes().decode("utf-8-sig")
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not JSON ({err.msg}); write one object per line, "
                              f"{example}") from None


def _held_out(row: dict[str, Any], fraction: float) -> bool:
    """A stable share of the rows, chosen by a hash of their content."""
    text = json.dumps({k: v for k, v in row.items() if k != "where"}, sort_keys=True)
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def open_rows(config, split: str, read: Callable[[str], list[dict[str, Any]]], what: str) -> RowSource:
    """Rows of `split`: train from data.train_files; validation from data.validation_files, or
    else a data.validation_fraction share of the training rows (left out of training)."""
    held_out = not config.validation_files
    if split == "validation" and held_out and not config.validation_fraction > 0:
        raise ConfigError(f"no validation {what}: set data.validation_files, or "
                          "data.validation_fraction (e.g. 0.1 of the training rows)")
    key = "data.validation_files" if split == "validation" and not held_out else "data.train_files"
    patterns = config.validation_files if key == "data.validation_files" else config.train_files
    if not patterns:
        raise ConfigError(f"{key} is empty: set it to JSONL files of {what}")
    files: list[str] = []
    for pattern in patterns:
        matched = paths.glob(pattern, key)
        if not matched:
            raise MissingInputError(f"{key} pattern {pattern!r} matches no file; fix the path or glob")
        files.extend(matched)
    rows = [row for path in sorted(set(files)) for row in read(path)]
    if held_out and config.validation_fraction > 0:
        rows = [row for row in rows if _held_out(row, config.validation_fraction) == (split == "validation")]
    if not rows:
        raise ConfigError(f"the {split} split of {key}={list(patterns)} is empty; add rows or "
                          "change data.validation_fraction")
    return RowSource(rows, f"{split}: {key}={list(patterns)}")
