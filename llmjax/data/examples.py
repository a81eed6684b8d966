"""Turn one record into the pieces a batch kind is made of (numpy only, no batching).

A piece is a dict of 1-D int32 arrays. For packed kinds (lm, sft) a piece is
one segment of a row (at most seq_len long); for the other kinds a piece is
one whole row before padding.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from llmjax.data.tokenizer import SpecialTokens, Tokenizer

Piece = dict[str, np.ndarray]
_SENTENCE_END = re.compile(r"(?<=[.!?。！？;；])\s+|(?<=[。！？；])")


@dataclasses.dataclass
class Counters:
    """Counted events of example building (never silent loss)."""

    documents: int = 0
    empty_documents: int = 0  # no tokens at all: skipped
    split_documents: int = 0  # longer than a row: split into chunks (lm)
    truncated_examples: int = 0  # longer than its fixed field: truncated (seq2seq, sft, classification, nsp, preference)
    unpaired_documents: int = 0  # fewer than 2 tokens: no NSP pair possible


def nsp_lengths(seq_len: int) -> tuple[int, int]:
    """(La, Lb) for [CLS] A [SEP] B [SEP] in seq_len tokens."""
    first = (seq_len - 3) // 2
    return first, seq_len - 3 - first


class ExampleBuilder:
    """Record -> pieces for one batch kind."""

    def __init__(self, kind: str, fields: dict[str, str], tokenizer: Tokenizer | None, special: SpecialTokens,
                 seq_len: int, target_len: int, add_eos: bool, label_names: list[str], chat: Any = None):
        self.kind, self.fields, self.tokenizer, self.special = kind, fields, tokenizer, special
        self.chat = chat  # a data.chat.ChatRenderer when the sft rows are conversations
        self.seq_len, self.target_len, self.add_eos = seq_len, target_len, add_eos
        self.label_ids = {name: i for i, name in enumerate(label_names)}
        self.counters = Counters()
        builders: dict[str, Callable[[dict[str, Any]], list[Piece]]] = {
            "lm": self._lm, "nsp": self._nsp, "seq2seq": self._seq2seq, "sft": self._sft,
            "classification": self._classification, "preference": self._preference,
        }
        if kind not in builders:
            raise ValueError(f"unknown batch kind {kind!r}; use one of {sorted(builders)}.")
        self._build = builders[kind]

    def __call__(self, record: dict[str, Any]) -> list[Piece]:
        self.counters.documents += 1
        return self._build(record)

    def _ids(self, record: dict[str, Any], role: str) -> list[int]:
        field = self.fields[role]
        if field not in record:
            raise KeyError(f"record has no field {field!r} (fields: {sorted(record)}); fix data.{role}_field / text_field.")
        value = record[field]
        if isinstance(value, str):
            if self.tokenizer is None:
                raise ValueError("the data holds text but no tokenizer is configured; set data.tokenizer.")
            return self.tokenizer.encode(value)
        return [int(v) for v in value]

    def _eos(self) -> list[int]:
        return [self.special.eos] if self.add_eos else []

    def _lm(self, record: dict[str, Any]) -> list[Piece]:
        ids = self._ids(record, "text")
        if not ids:
            self.counters.empty_documents += 1
            return []
        ids = np.asarray(ids + self._eos(), np.int32)
        if len(ids) > self.seq_len:
            self.counters.split_documents += 1
        return [{"tokens": ids[i:i + self.seq_len]} for i in range(0, len(ids), self.seq_len)]

    def _sft(self, record: dict[str, Any]) -> list[Piece]:
        if self.chat is not None:  # a whole conversation, assistant turns in the loss
            from llmjax.data.chat import conversation_piece

            ids, mask = self.chat.encode(record["messages"], record.get("where", ""))
            piece, cut = conversation_piece(ids, mask, self.seq_len)
            self.counters.truncated_examples += int(cut)
            return [piece]
        prompt, response = self._ids(record, "input"), self._ids(record, "target") + self._eos()
        if len(prompt) + len(response) > self.seq_len:
            self.counters.truncated_examples += 1
            keep_prompt = max(self.seq_len - len(response), self.seq_len // 2)
            prompt = prompt[-keep_prompt:] if keep_prompt else []
            response = response[: self.seq_len - len(prompt)]
        if not prompt and not response:
            self.counters.empty_documents += 1
            return []
        tokens = np.asarray(prompt + response, np.int32)
        loss_mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)])
        return [{"tokens": tokens, "loss_mask": loss_mask}]

    def _preference(self, record: dict[str, Any]) -> list[Piece]:
        from llmjax.data.preference import pair_piece

        if isinstance(record["prompt"], list) and record["prompt"] and isinstance(record["prompt"][0], dict):
            where = record.get("where", "")  # messages: rendered with the chat template
            prompt, chosen = self.chat.prompt_and_completion(record["prompt"], record["chosen"], where)
            prompt_r, rejected = self.chat.prompt_and_completion(record["prompt"], record["rejected"], where)
            if prompt_r != prompt:
                from llmjax.errors import ConfigError

                raise ConfigError(f"{where}: the template renders the prompt differently before the "
                                 "chosen and the rejected reply; give the prompt as text instead")
        else:
            prompt = self._ids(record, "prompt")
            chosen, rejected = self._ids(record, "chosen") + self._eos(), self._ids(record, "rejected") + self._eos()
        piece, cut = pair_piece(prompt, chosen, rejected, self.seq_len)
        if cut:
            self.counters.truncated_examples += 1
        return [piece]

    def _seq2seq(self, record: dict[str, Any]) -> list[Piece]:
        inputs, targets = self._ids(record, "input") + self._eos(), self._ids(record, "target") + self._eos()
        if len(inputs) > self.seq_len or len(targets) > self.target_len:
            self.counters.truncated_examples += 1
        return [{"inputs": np.asarray(inputs[: self.seq_len], np.int32),
                 "targets": np.asarray(targets[: self.target_len], np.int32)}]

    def _classification(self, record: dict[str, Any]) -> list[Piece]:
        second = self._ids(record, "pair") if "pair" in self.fields else None
        tokens, types, cut = frame_classification(self._ids(record, "input"), second, self.special, self.seq_len)
        if cut:
            self.counters.truncated_examples += 1
        return [{"tokens": tokens, "token_types": types, "labels": np.asarray([self._label(record)], np.int32)}]

    def _label(self, record: dict[str, Any]) -> int:
        value = record[self.fields["label"]]
        if isinstance(value, str):
            if value not in self.label_ids:
                raise ValueError(f"label {value!r} is not in data.label_names={sorted(self.label_ids)}; "
                                 "list every class name there (its position is the label id).")
            return self.label_ids[value]
        return int(value)

    def _nsp(self, record: dict[str, Any]) -> list[Piece]:
        """Consecutive (A, B) pairs where B truly follows A in the document, sentence-aligned when possible."""
        first_len, second_len = nsp_lengths(self.seq_len)
        value = record[self.fields["text"]]
        if isinstance(value, str):
            sentences = _sentences(value)
            ids = self.tokenizer.encode_batch(sentences) if self.tokenizer and sentences else []
            ids = [s for s in ids if s]
        else:
            ids = [[int(v) for v in value]]
        if len(ids) == 1:  # one sentence: cut its tokens into (A, B) windows
            tokens, window = ids[0], first_len + second_len
            if len(tokens) < 2:
                self.counters.unpaired_documents += 1
                return []
            pieces = []
            for start in range(0, len(tokens), window):
                chunk = tokens[start:start + window]
                if len(chunk) >= 2:
                    cut = min(first_len, len(chunk) // 2)
                    pieces.append(_pair(chunk[:cut], chunk[cut:], first_len, second_len))
            return pieces
        if len(ids) < 2:
            self.counters.unpaired_documents += 1
            return []
        pieces, i = [], 0
        while i < len(ids) - 1:
            j = i + 1
            a = list(ids[i])
            while j < len(ids) - 1 and len(a) + len(ids[j]) <= first_len:
                a += ids[j]
                j += 1
            b = list(ids[j])
            k = j + 1
            while k < len(ids) and len(b) + len(ids[k]) <= second_len:
                b += ids[k]
                k += 1
            if len(a) > first_len or len(b) > second_len:
                self.counters.truncated_examples += 1
            pieces.append(_pair(a, b, first_len, second_len))
            i = k
        return pieces


def frame_classification(first: list[int], second: list[int] | None, special: Any,
                         seq_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """[CLS] first [SEP] (second [SEP]) in at most seq_len tokens, and its token types (0 on
    the first part, 1 on the pair): (tokens, token_types, whether the texts were cut)."""
    first, second, cut = truncate_pair(list(first), None if second is None else list(second), seq_len)
    tokens = [special["cls"]] + first + [special["sep"]]
    types = [0] * len(tokens)
    if second is not None:
        tokens += second + [special["sep"]]
        types += [1] * (len(second) + 1)
    return np.asarray(tokens, np.int32), np.asarray(types, np.int32), cut


def truncate_pair(first: list[int], second: list[int] | None, seq_len: int) -> tuple[list[int], list[int] | None, bool]:
    """Fit [CLS] first [SEP] (second [SEP]) into seq_len, trimming the longer text first (as HF's
    longest_first): returns (first, second, whether anything was cut)."""
    budget = seq_len - (2 if second is None else 3)
    if second is None:
        return first[:budget], None, len(first) > budget
    a, b = len(first), len(second)
    cut = a + b > budget
    while a + b > budget:
        if a >= b:
            a -= 1
        else:
            b -= 1
    return first[:a], second[:b], cut


def _pair(a: list[int], b: list[int], first_len: int, second_len: int) -> Piece:
    """A keeps its tail and B its head, so the cut stays at the true A|B boundary."""
    return {"tokens_a": np.asarray(a[-first_len:], np.int32), "tokens_b": np.asarray(b[:second_len], np.int32)}


def _sentences(text: str) -> list[str]:
    """Non-empty lines; a single-line text is cut at sentence ends instead."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) == 1:
        lines = [s for s in _SENTENCE_END.split(lines[0]) if s.strip()]
    return lines
