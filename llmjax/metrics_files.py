"""Where a run's metric rows live, and how they are read back.

Local run directory: one `metrics.jsonl`, appended a line per row (cheap on a file system).

Object storage (`gs://`, `s3://`): objects are immutable, so appending a line means rewriting
the whole object: a million steps would upload ~10^12 bytes. Instead rows are buffered and
written as numbered chunk objects `metrics/000000000000.jsonl`, `metrics/000000000001.jsonl`,
... each holding the rows since the previous one, flushed every `FLUSH_ROWS` rows or
`FLUSH_SECONDS` seconds and when the writer is flushed or closed (the trainer flushes at every
checkpoint). A million steps logged every step are ~1,000 objects of ~200 kB; reading them
back is one listing plus one read per chunk, in name order. A kill loses at most the rows
since the last flush, which are past the last checkpoint and so dropped on resume anyway.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence

from llmjax import paths

METRICS_FILE = "metrics.jsonl"
CHUNK_DIR = "metrics"
FLUSH_ROWS = 1000
FLUSH_SECONDS = 60.0


def parse_rows(text: str) -> list[dict]:
    """JSON object rows of JSONL text; a line cut short by a kill (or not an object) is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def chunk_paths(run_dir: str | os.PathLike) -> list:
    """The chunk objects of `run_dir` (epath), in order."""
    directory = paths.resolve(run_dir, "run directory").joinpath(CHUNK_DIR)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.name.endswith(".jsonl") and p.name[:-6].isdigit()),
                  key=lambda p: p.name)


def has_metrics(run_dir: str | os.PathLike) -> bool:
    root = paths.resolve(run_dir, "run directory")
    return root.joinpath(METRICS_FILE).is_file() or bool(chunk_paths(run_dir))


def read_rows(run_dir: str | os.PathLike) -> list[dict]:
    """Every row of a run: its metrics.jsonl when there is one, else its chunks concatenated."""
    root = paths.resolve(run_dir, "run directory")
    single = root.joinpath(METRICS_FILE)
    if single.is_file():
        return parse_rows(single.read_bytes().decode("utf-8", errors="replace"))
    rows: list[dict] = []
    for chunk in chunk_paths(run_dir):
        rows.extend(parse_rows(chunk.read_bytes().decode("utf-8", errors="replace")))
    return rows


def rows_text(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


class ChunkedRows:
    """Buffers rows and writes them as numbered chunk objects under run_dir/metrics/.

    `on_chunk(sequence, rows)` is called after each chunk is written (the TensorBoard events
    of the same rows go beside it)."""

    def __init__(self, run_dir: str | os.PathLike, on_chunk=None, flush_rows: int = FLUSH_ROWS,
                 flush_seconds: float = FLUSH_SECONDS):
        self.directory = paths.resolve(run_dir, "train.run_dir").joinpath(CHUNK_DIR)
        self.on_chunk = on_chunk
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        existing = chunk_paths(run_dir)
        self.next_sequence = int(existing[-1].name[:-6]) + 1 if existing else 0
        self.buffer: list[dict] = []
        self.last_flush = time.monotonic()

    def append(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        rows, self.buffer = self.buffer, []
        sequence = self.next_sequence
        self.directory.joinpath(chunk_name(sequence)).write_text(rows_text(rows), encoding="utf-8")
        self.next_sequence += 1
        if self.on_chunk is not None:
            self.on_chunk(sequence, rows)


def chunk_name(sequence: int) -> str:
    return f"{sequence:012d}.jsonl"


def trim_chunks(run_dir: str | os.PathLike, step: int) -> Iterator[tuple[int, list[dict]]]:
    """Drop the rows past `step` from the chunks of `run_dir`, newest chunk first, stopping at
    the first chunk that holds none (older ones cannot: rows are written in step order).
    Yields (sequence, kept rows) for every chunk changed: kept rows empty = chunk deleted."""
    for chunk in reversed(chunk_paths(run_dir)):
        text = chunk.read_bytes().decode("utf-8", errors="replace")
        rows = parse_rows(text)
        kept = [row for row in rows if row.get("step", 0) <= step]
        if len(kept) == len(rows) and len(text.splitlines()) == len(rows):
            return
        if kept:
            chunk.write_text(rows_text(kept), encoding="utf-8")
        else:
            chunk.unlink()
        yield int(chunk.name[:-6]), kept
        if kept:
            return
