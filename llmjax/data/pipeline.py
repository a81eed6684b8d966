"""The host input pipeline: documents -> pieces -> fixed-shape rows -> per-host batches.

Design (why not grain: see docs/data.md). Row r of every global batch is
produced by its own *stream* r, which reads documents r, r+B, r+2B, ... of a
seeded per-epoch permutation (B = global batch size) and packs their pieces
into rows. Hence:
- a host computes only its own rows (streams [h*B/P, (h+1)*B/P)), and the
  hosts' batches are disjoint and together are exactly the single-host batch;
- the iterator state is two integers per local stream (document, piece; and the tokens
  of that piece already emitted with data.pack_split), so a restored iterator yields
  exactly the batches of an uninterrupted run;
- every token of every document is emitted once per epoch (long documents are
  split into row-sized chunks, never dropped).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llmjax.data.config import DataConfig, fields_for_kind
from llmjax.data.examples import Counters, ExampleBuilder, Piece, nsp_lengths
from llmjax.data.sources import DocumentSource, open_source
from llmjax.data.tokenizer import SpecialTokens, Tokenizer, load_tokenizer

KINDS = ("lm", "nsp", "seq2seq", "sft", "classification", "preference")
PACKABLE = ("lm", "sft", "classification")
_ROLES = {"lm": ("text",), "nsp": ("text",), "seq2seq": ("input", "target"), "sft": ("input", "target"),
          "classification": ("input", "label"), "preference": ("prompt", "chosen", "rejected")}
NO_LABEL = -1  # label of an unused example slot of a packed classification row
STATE_VERSION = 1
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------- shuffling


def _mix(value: int) -> int:
    """splitmix64 finaliser: a cheap, well-mixing 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def shuffled_index(index: int, size: int, seed: int, epoch: int, rounds: int = 6) -> int:
    """Position `index` of a seeded random permutation of range(size), in O(1) memory.

    A Feistel network over the next power of two, cycle-walked into range:
    a bijection, so each epoch visits every document exactly once, and no
    permutation array is stored (C4 has 365M documents).
    """
    if size <= 1:
        return 0
    bits = max(2, (size - 1).bit_length())
    left_bits = bits // 2
    right_bits = bits - left_bits
    left_mask, right_mask = (1 << left_bits) - 1, (1 << right_bits) - 1
    key = _mix(_mix(seed & _MASK64) ^ (epoch & _MASK64))
    value = index
    while True:
        left, right = value >> right_bits, value & right_mask
        for round_index in range(rounds):
            # Unbalanced Feistel: alternate which half is updated so both sizes stay fixed.
            if round_index % 2 == 0:
                left = (left ^ _mix(key ^ (round_index << 56) ^ right)) & left_mask
            else:
                right = (right ^ _mix(key ^ (round_index << 56) ^ left)) & right_mask
        value = (left << right_bits) | right
        if value < size:
            return value


# ---------------------------------------------------------------- streams


class _Stream:
    """Row stream `index` of `num_streams`: documents index, index+num_streams, ... of the epoch orders."""

    def __init__(self, index: int, num_streams: int, num_documents: int, order: Callable[[int, int], int],
                 pieces_of: Callable[[int], list[Piece]], seq_len: int, packed: bool, num_epochs: int | None,
                 max_pieces: int = 0, split: bool = False):
        self.index, self.num_streams, self.num_documents = index, num_streams, num_documents
        self.order, self.pieces_of, self.seq_len, self.packed = order, pieces_of, seq_len, packed
        self.max_pieces = max_pieces  # 0: as many as fit (lm, sft); classification: the label slots
        self.split = split  # a piece that does not fit fills the row and goes on in the next one
        self.num_epochs = num_epochs
        self.document = 0  # k: the stream's k-th document
        self.piece = 0  # next piece of that document
        self.offset = 0  # tokens of that piece already in earlier rows (split only)
        self._cached: tuple[int, list[Piece]] | None = None

    def _global_position(self, document: int) -> tuple[int, int]:
        return divmod(document * self.num_streams + self.index, self.num_documents)

    def exhausted(self) -> bool:
        return self.num_epochs is not None and self._global_position(self.document)[0] >= self.num_epochs

    def _pieces(self) -> list[Piece]:
        if self._cached is None or self._cached[0] != self.document:
            epoch, position = self._global_position(self.document)
            self._cached = (self.document, self.pieces_of(self.order(epoch, position)))
        return self._cached[1]

    def next_row(self) -> list[Piece]:
        """The pieces of the next row (empty only when the stream is exhausted)."""
        row: list[Piece] = []
        used, empty_run = 0, 0
        while not self.exhausted():
            pieces = self._pieces()
            if self.piece >= len(pieces):
                empty_run = empty_run + 1 if not pieces else 0
                if empty_run > max(self.num_documents, 1000):
                    raise ValueError(f"{empty_run} consecutive documents produced no tokens; the data holds no "
                                     "usable text for this batch kind (check the fields and the tokenizer).")
                self.document, self.piece = self.document + 1, 0
                continue
            piece = pieces[self.piece]
            if self.offset:
                piece = {key: value[self.offset:] for key, value in piece.items()}
            size = _piece_length(piece)
            if row and (not self.packed or used + size > self.seq_len
                        or (self.max_pieces and len(row) >= self.max_pieces)):
                room = self.seq_len - used
                if self.split and self.packed and used + size > self.seq_len and room > 0:
                    row.append({key: value[:room] for key, value in piece.items()})
                    self.offset += room
                break
            row.append(piece)
            used += size
            self.piece, self.offset = self.piece + 1, 0
            if not self.packed:
                break
        return row


def _piece_length(piece: Piece) -> int:
    return len(piece["tokens"]) if "tokens" in piece else 0


# ---------------------------------------------------------------- batches


def _assemble(kind: str, rows: list[list[Piece]], seq_len: int, target_len: int,
              max_segments: int = 0, values: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Fixed-shape int32 arrays from rows of pieces; pad id 0 everywhere, segment id 0 = padding.

    Classification: labels [B] (one example per row), or [B, max_segments] when packed (the
    label of segment k+1 at k, NO_LABEL in unused slots). `values`: per-document float
    fields of one-piece rows (BatchIterator.attach), float32 [B], 0 in empty rows."""
    size = len(rows)
    if kind in ("nsp", "seq2seq", "preference"):  # one piece per row: left-aligned fields, zero padded
        if kind == "preference":
            widths = dict.fromkeys(("chosen", "chosen_mask", "rejected", "rejected_mask"), seq_len)
        elif kind == "nsp":
            widths = dict(zip(("tokens_a", "tokens_b"), nsp_lengths(seq_len)))
        else:
            widths = {"inputs": seq_len, "targets": target_len}
        batch = {key: np.zeros((size, width), np.int32) for key, width in widths.items()}
        batch.update({name: np.zeros((size,), np.float32) for name in values})
        for r, row in enumerate(rows):
            for piece in row:
                for key in widths:
                    batch[key][r, : len(piece[key])] = piece[key]
                for name in values:
                    batch[name][r] = piece[name]
        return batch
    batch = {name: np.zeros((size, seq_len), np.int32) for name in ("tokens", "segment_ids", "positions")}
    if kind == "sft":
        batch["loss_mask"] = np.zeros((size, seq_len), np.int32)
    if kind == "classification":
        batch["token_types"] = np.zeros((size, seq_len), np.int32)
        batch["labels"] = (np.full((size, max_segments), NO_LABEL, np.int32) if max_segments
                           else np.zeros((size,), np.int32))
    for r, row in enumerate(rows):
        start = 0
        for segment, piece in enumerate(row, start=1):
            end = start + len(piece["tokens"])
            batch["tokens"][r, start:end] = piece["tokens"]
            batch["segment_ids"][r, start:end] = segment
            batch["positions"][r, start:end] = np.arange(end - start, dtype=np.int32)
            if "loss_mask" in piece:
                batch["loss_mask"][r, start:end] = piece["loss_mask"]
            if "token_types" in piece:
                batch["token_types"][r, start:end] = piece["token_types"]
            if "labels" in piece:
                if max_segments:
                    batch["labels"][r, segment - 1] = piece["labels"][0]
                else:
                    batch["labels"][r] = piece["labels"][0]
            start = end
    return batch


def _real_tokens(kind: str, batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """(non-padding tokens, token slots) of a batch, for packing efficiency."""
    keys = {"nsp": ("tokens_a", "tokens_b"), "seq2seq": ("inputs", "targets"),
            "preference": ("chosen_mask", "rejected_mask")}.get(kind)
    if keys:
        return sum(int(np.count_nonzero(batch[k])) for k in keys), sum(batch[k].size for k in keys)
    return int(np.count_nonzero(batch["segment_ids"])), batch["segment_ids"].size


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """This host's batches (dicts of int32 numpy arrays); resumable through get_state / set_state."""

    def __init__(self, source: DocumentSource, make_builder: Callable[[], ExampleBuilder], kind: str, seq_len: int,
                 target_len: int, global_batch_size: int, process_index: int, process_count: int, shuffle: bool,
                 seed: int, num_epochs: int | None, num_workers: int, pack: bool = True, max_segments: int = 0,
                 pack_split: bool = False):
        if kind not in KINDS:
            raise ValueError(f"unknown batch kind {kind!r}; use one of {KINDS}.")
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the process count "
                             f"{process_count}; make train.batch_size a multiple of {process_count}.")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
        if len(source) == 0:
            raise ValueError("the data source holds no records; check the dataset and split.")
        self.kind, self.seq_len, self.target_len = kind, seq_len, target_len
        self.global_batch_size, self.process_index, self.process_count = global_batch_size, process_index, process_count
        self.shuffle, self.seed, self.num_epochs = shuffle, seed, num_epochs
        self.source = source
        self.num_documents = len(source)
        # Packed classification rows hold up to max_segments examples (static label shape).
        self.max_segments = max_segments if kind == "classification" and pack else 0
        # lm rows only: sft/classification pieces must stay whole (loss masks, labels).
        self.pack_split = pack_split and kind == "lm" and pack
        local = global_batch_size // process_count
        self._make_builder, self._probe = make_builder, None
        self._values: dict[str, np.ndarray] = {}  # per-document floats (attach)
        self._builders = [make_builder() for _ in range(local)]
        self._streams = [
            _Stream(process_index * local + i, global_batch_size, self.num_documents, self._order,
                    self._pieces_with(builder), seq_len, kind in PACKABLE and pack, num_epochs, self.max_segments,
                    self.pack_split)
            for i, builder in enumerate(self._builders)
        ]
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self.batches = 0
        self._tokens = 0
        self._slots = 0

    def _order(self, epoch: int, position: int) -> int:
        return shuffled_index(position, self.num_documents, self.seed, epoch) if self.shuffle else position

    def _pieces_with(self, builder: ExampleBuilder) -> Callable[[int], list[Piece]]:
        def pieces(index: int) -> list[Piece]:
            out = builder(self.source[index])
            if self._values:
                out = [{**piece, **{k: v[index] for k, v in self._values.items()}} for piece in out]
            return out
        return pieces

    def document_pieces(self, index: int) -> list[Piece]:
        """The pieces of document `index` of the source (in source order, not shuffled), made
        by a builder of their own: the iterator's position and counters are untouched."""
        return self._probe_builder()(self.source[index])

    def batch_of(self, indices: list[int]) -> dict[str, np.ndarray]:
        """A batch whose row r holds document indices[r] of the source (an index past the
        end: an empty row), outside the iteration order; attached values included."""
        rows = [self._pieces_with(self._probe_builder())(i) if i < self.num_documents else []
                for i in indices]
        return _assemble(self.kind, rows, self.seq_len, self.target_len, self.max_segments,
                         tuple(self._values))

    def _probe_builder(self) -> ExampleBuilder:
        if self._probe is None:
            self._probe = self._make_builder()
        return self._probe

    def attach(self, values: dict[str, np.ndarray]) -> None:
        """Add per-document floats to every batch: field `name` (float32 [B]) holds row r's
        document's `values[name][document]` (e.g. cached dpo reference log-probs,
        llmjax/train/reference_cache.py). Only for kinds with one document per row; call
        before the first batch. The iterator state does not change (resume stays exact)."""
        if self.kind != "preference":
            raise ValueError(f"per-document values need one document per row; not kind {self.kind!r}")
        for name, array in values.items():
            if np.shape(array) != (self.num_documents,):
                raise ValueError(f"values {name!r} have shape {np.shape(array)}, not "
                                 f"({self.num_documents},) (one per document of the source)")
        self._values = {name: np.asarray(array, np.float32) for name, array in values.items()}

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if all(stream.exhausted() for stream in self._streams):
            raise StopIteration
        if self._pool is None:
            rows = [stream.next_row() for stream in self._streams]
        else:
            rows = list(self._pool.map(_Stream.next_row, self._streams))
        batch = _assemble(self.kind, rows, self.seq_len, self.target_len, self.max_segments,
                          tuple(self._values))
        tokens, slots = _real_tokens(self.kind, batch)
        self.batches += 1
        self._tokens += tokens
        self._slots += slots
        return batch

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of this host's batch arrays (int32; attached values float32)."""
        return {k: v.shape for k, v in _assemble(self.kind, [[]] * (self.global_batch_size // self.process_count),
                                                    self.seq_len, self.target_len, self.max_segments,
                                                    tuple(self._values)).items()}

    def stats(self) -> dict[str, Any]:
        """Counters so far: documents, skips, splits, truncations, tokens, packing efficiency."""
        totals = Counters()
        for builder in self._builders:
            for field in dataclasses.fields(Counters):
                setattr(totals, field.name, getattr(totals, field.name) + getattr(builder.counters, field.name))
        return {**dataclasses.asdict(totals), "batches": self.batches, "tokens": self._tokens,
                "token_slots": self._slots, "packing_efficiency": self._tokens / self._slots if self._slots else 0.0}

    def _fingerprint(self) -> dict[str, Any]:
        out = {"version": STATE_VERSION, "kind": self.kind, "seq_len": self.seq_len, "target_len": self.target_len,
               "global_batch_size": self.global_batch_size, "process_index": self.process_index,
               "process_count": self.process_count, "num_documents": self.num_documents, "shuffle": self.shuffle,
               "seed": self.seed}
        if self.max_segments:  # packed classification; absent otherwise, as in states saved before packing
            out["max_segments"] = self.max_segments
        if self.pack_split:  # absent otherwise, as in states saved before data.pack_split
            out["pack_split"] = True
        return out

    def get_state(self) -> dict[str, Any]:
        """Small JSON-serialisable state of this host's iterator (one per process, like grain's)."""
        return {**self._fingerprint(), "batches": self.batches, "tokens": self._tokens, "token_slots": self._slots,
                "streams": [[s.document, s.piece] + ([s.offset] if self.pack_split else [])
                            for s in self._streams]}

    def set_state(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue exactly where the iterator that produced `state` was. A list holds the
        states of every process of a run with another process count (in process order): the
        global row streams are re-divided, so the run continues with the same global batches."""
        if isinstance(state, list):
            state = self._share_of(state)
        expected = self._fingerprint()
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {saved!r} vs now {now!r}" for k, (saved, now) in mismatched.items())
            raise ValueError(f"data iterator state does not match this pipeline ({details}); resume with the same "
                             "data config, sequence length, batch size and process layout, or start the data afresh.")
        if len(state["streams"]) != len(self._streams):
            raise ValueError(f"state has {len(state['streams'])} streams, this host has {len(self._streams)}.")
        for stream, (document, piece, *offset) in zip(self._streams, state["streams"]):
            stream.document, stream.piece = int(document), int(piece)
            stream.offset = int(offset[0]) if offset else 0
        self.batches, self._tokens, self._slots = int(state["batches"]), int(state["tokens"]), int(state["token_slots"])

    def _share_of(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """This process's state from all the states of a run with len(states) processes: the
        streams are global rows (stream g feeds row g of every global batch), so they are
        concatenated in process order and sliced again. Token counters (statistics only)
        are divided evenly."""
        layout = ("process_index", "process_count")
        mine = {k: v for k, v in self._fingerprint().items() if k not in layout}
        for index, state in enumerate(states):
            saved = {k: state.get(k) for k in mine}
            if saved != mine or state.get("process_index") != index or \
                    state.get("process_count") != len(states):
                details = ", ".join(f"{k}: saved {saved[k]!r} vs now {v!r}" for k, v in mine.items()
                                    if saved[k] != v) or "process indices out of order"
                raise ValueError(f"data iterator states of {len(states)} processes do not match "
                                 f"this pipeline ({details}); resume with the same data config, "
                                 f"sequence length and batch size, or start the data afresh.")
        if len({int(s["batches"]) for s in states}) != 1:
            raise ValueError("data iterator states of different processes are at different "
                             "batches: the checkpoint is inconsistent")
        streams = [stream for state in states for stream in state["streams"]]
        local = self.global_batch_size // self.process_count
        return {**self._fingerprint(), "batches": int(states[0]["batches"]),
                "tokens": sum(int(s["tokens"]) for s in states) // self.process_count,
                "token_slots": sum(int(s["token_slots"]) for s in states) // self.process_count,
                "streams": streams[self.process_index * local:(self.process_index + 1) * local]}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


# ---------------------------------------------------------------- entry point


def make_iterator(
    config: DataConfig,
    kind: str,
    seq_len: int,
    global_batch_size: int,
    split: str = "train",
    *,
    tokenizer: Tokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    target_len: int | None = None,
    vocab_size: int | None = None,
) -> BatchIterator:
    """This host's batch iterator for `kind` ("lm", "nsp", "seq2seq", "sft", "classification").

    seq_len is the row length (encoder input length for seq2seq; target_len
    defaults to it). num_epochs=None repeats forever; a finite num_epochs ends
    when this host's rows are exhausted (single-host evaluation; multi-host
    evaluation should run a fixed number of batches instead). The validation
    split is never shuffled. process_index/count default to jax's.
    """
    config.validate()
    if kind not in KINDS:
        raise ValueError(f"unknown batch kind {kind!r}; use one of {KINDS}.")
    if seq_len < 4:
        raise ValueError(f"seq_len={seq_len} is too short; use at least 4 (NSP needs [CLS] A [SEP] B [SEP]).")
    if global_batch_size < 1:
        raise ValueError(f"global batch size {global_batch_size} must be >= 1.")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if tokenizer is None and config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    special = tokenizer.special_ids if tokenizer is not None else SpecialTokens()
    if config.source == "synthetic":
        fields = {role: role for role in _ROLES[kind]}  # synthetic records are keyed by role
    else:
        fields = fields_for_kind(config, kind)
    source = open_source(config, split, fields=list(fields.values()), first_id=special.num_special,
                         vocab_size=vocab_size or (tokenizer.vocab_size if tokenizer is not None else None))
    target = target_len or seq_len
    chat = None
    if config.source == "chat":
        from llmjax.data.chat import ChatRenderer

        chat = ChatRenderer(tokenizer, config.chat_template)
    elif config.source == "preference":  # prompts given as messages need the template
        from llmjax.data.chat import LazyChatRenderer

        chat = LazyChatRenderer(tokenizer, config.chat_template)

    def make_builder() -> ExampleBuilder:
        return ExampleBuilder(kind, fields, tokenizer, special, seq_len, target, config.add_eos,
                              list(config.label_names), chat)

    return BatchIterator(source, make_builder, kind, seq_len, target, global_batch_size, process_index,
                         process_count, shuffle=config.shuffle and split == "train", seed=config.seed,
                         num_epochs=num_epochs, num_workers=config.num_workers, pack=config.pack,
                         max_segments=config.max_segments or max(1, seq_len // 8),
                         pack_split=config.pack_split)


def epoch_statistics(config: DataConfig, seq_len: int, split: str = "train", *,
                     tokenizer: Tokenizer | None = None, progress: bool = True) -> dict[str, Any]:
    """One pass over `split` as lm rows: documents, tokens, rows and packing efficiency (real tokens / slots)."""
    from tqdm import tqdm

    iterator = make_iterator(config, "lm", seq_len, 1, split, tokenizer=tokenizer, process_index=0,
                             process_count=1, num_epochs=1)
    rows = 0
    with tqdm(total=iterator.num_documents, desc=f"packing {split}", unit="doc", disable=not progress) as bar:
        for batch in iterator:
            rows += int(batch["segment_ids"].any())
            bar.update(min(iterator._streams[0].document, iterator.num_documents) - bar.n)
    stats = iterator.stats()
    return {"split": split, "documents": iterator.num_documents, "empty_documents": stats["empty_documents"],
            "split_documents": stats["split_documents"], "tokens": stats["tokens"], "rows": rows,
            "seq_len": seq_len, "packing_efficiency": stats["tokens"] / (rows * seq_len) if rows else 0.0}
