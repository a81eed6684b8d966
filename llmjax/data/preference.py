"""Preference pairs: JSONL rows {"prompt", "chosen", "rejected"} (TRL's format).

Each value is text (tokenized with data.tokenizer) or a list of token ids; the prompt may
also be a list of {role, content} messages: then prompt and completions are rendered with the
chat template (data.chat_template or the tokenizer's, llmjax/data/chat.py), each completion
as the assistant's reply with its end-of-turn marker. Every row is
checked when the files are opened, so a bad row fails the run before any compile, naming
the file and line: a missing or empty field, or chosen == rejected (a pair that teaches
nothing and holds the loss at ln 2).

A pair becomes one row of the "preference" batch kind: `chosen` and `rejected` token ids
(prompt + completion, eos appended with data.add_eos) with masks 0 = padding, 1 = prompt,
2 = completion (read by llmjax/objectives/preference.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from llmjax.data.jsonl_rows import json_lines
from llmjax.errors import ConfigError

FIELDS = ("prompt", "chosen", "rejected")
KEYS = ("chosen", "chosen_mask", "rejected", "rejected_mask")  # host batch arrays [B, seq_len]


def read_pairs(path: str) -> list[dict[str, Any]]:
    """The checked rows of one JSONL file, each with its "where" ("file line n")."""
    rows = []
    for where, record in json_lines(path, '{"prompt": ..., "chosen": ..., "rejected": ...}'):
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: a JSON {type(record).__name__}, not an object")
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise ConfigError(f"{where}: no field {' or '.join(map(repr, missing))} (the row has "
                              f"{sorted(record)}); a preference row needs {list(FIELDS)}")
        for field in FIELDS:
            value = record[field]
            ok = isinstance(value, str) or (isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value))
            if field == "prompt" and is_messages(value):  # rendered with the chat template
                ok = all(isinstance(record[f], str) for f in ("chosen", "rejected"))
            if not ok:
                raise ConfigError(f"{where}: field {field!r} is a {type(value).__name__}; use "
                                  "text or a list of token ids (the prompt may also be a list of "
                                  "{role, content} messages, with text completions)")
            if field != "prompt" and not value:
                raise ConfigError(f"{where}: field {field!r} is empty; a completion needs tokens")
        if record["chosen"] == record["rejected"]:
            raise ConfigError(f"{where}: 'chosen' equals 'rejected'; such a pair teaches nothing "
                              "(its DPO loss stays ln 2): fix or remove the row")
        rows.append({**{f: record[f] for f in FIELDS}, "where": where})
    if not rows:
        raise ConfigError(f"{path} holds no rows; write one JSON object per line")
    return rows


def is_messages(value) -> bool:
    """A list of {"role": str, "content": str} messages."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)


def open_preference(config, split: str):
    """The checked rows of data.train_files / data.validation_files (or a held-out share)."""
    from llmjax.data.jsonl_rows import open_rows

    return open_rows(config, split, read_pairs, "preference pairs")


def pair_piece(prompt: list[int], chosen: list[int], rejected: list[int],
               seq_len: int) -> tuple[dict[str, np.ndarray], bool]:
    """One row of the preference kind and whether it was cut to seq_len. Both sides keep the
    same prompt: its tail when too long (at least half the row), then the completions' heads."""
    longest = max(len(chosen), len(rejected))
    cut = len(prompt) + longest > seq_len
    if cut:
        keep = max(seq_len - longest, seq_len // 2)
        prompt = prompt[len(prompt) - keep:] if keep < len(prompt) else prompt
    piece = {}
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        completion = completion[: seq_len - len(prompt)]
        piece[side] = np.asarray(prompt + completion, np.int32)
        piece[side + "_mask"] = np.asarray([1] * len(prompt) + [2] * len(completion), np.int32)
    return piece, cut
