"""Host pipeline throughput at long sequence lengths: tokens/s of packed `lm` batches from
`make_iterator` (no model) at seq 2K, 8K, 32K and 128K, on the Shakespeare demo corpus
(paragraph documents: many short segments per row; file documents: whole plays, split or
several per row; the same with data.pack_split, rows filled to the end) and synthetic ids.

    python benchmarks/data_long.py --cache ~/.cache/llmjax [--seq-lens 2048 8192 32768 131072]
        [--row-tokens 131072] [--min-tokens 2000000] [--workers 0]

Every batch holds about --row-tokens tokens (batch = row-tokens // seq_len rows, at least 1),
so the lengths are compared at equal work; each rate runs from a fresh iterator until
--min-tokens real tokens came out (opening the prepared source included).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from llmjax.data.config import DataConfig
from llmjax.data.corpus import shakespeare
from llmjax.data.pipeline import make_iterator
from llmjax.data.tokenizer import train_sentencepiece


def measure(config: DataConfig, seq_len: int, batch: int, min_tokens: int) -> dict:
    """Steady-state rate: from a fresh iterator (source already prepared) until min_tokens
    real tokens came out, so each stream's whole-document tokenization is paid for."""
    start = time.perf_counter()
    iterator = make_iterator(config, "lm", seq_len, batch, process_index=0, process_count=1)
    tokens = batches = 0
    while tokens < min_tokens:
        out = next(iterator)
        assert out["tokens"].shape == (batch, seq_len)
        tokens += int((out["segment_ids"] > 0).sum())
        batches += 1
    seconds = time.perf_counter() - start
    stats = iterator.stats()
    iterator.close()
    return {"tokens_s": tokens / seconds, "batch_ms": 1000 * seconds / batches,
            "batches": batches, "packing": stats["packing_efficiency"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/llmjax"))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--row-tokens", type=int, default=131072, help="tokens per batch")
    parser.add_argument("--min-tokens", type=int, default=2_000_000,
                        help="real tokens per measurement (the train corpus is ~1.2M)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers")
    args = parser.parse_args()

    train_files, validation_files = shakespeare(args.cache)
    work = tempfile.mkdtemp(prefix="llmjax-bench-")
    tokenizer_dir = os.path.join(work, "tok")
    train_sentencepiece(train_files, tokenizer_dir, args.vocab_size, model_type="bpe")
    sources = {f"shakespeare/{unit}": DataConfig(
        source="text", paths=train_files, validation_paths=validation_files, document_unit=unit,
        data_dir=os.path.join(work, "tfds"), tokenizer=tokenizer_dir, num_workers=args.workers)
        for unit in ("paragraph", "file")}
    sources["shakespeare/file, pack_split"] = dataclasses.replace(sources["shakespeare/file"],
                                                                  pack_split=True)
    sources["synthetic ids"] = DataConfig(source="synthetic", synthetic_vocab_size=args.vocab_size)

    for config in sources.values():  # prepare the TFDS datasets outside the timings
        make_iterator(config, "lm", 64, 1, process_index=0, process_count=1).close()
    print(f"lm batches of ~{args.row_tokens:,} tokens until {args.min_tokens:,} real tokens, "
          f"data.num_workers={args.workers}\n")
    print("| source | seq_len | rows | tokens/s | ms/batch | batches | packing |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, config in sources.items():
        for seq_len in args.seq_lens:
            batch = max(1, args.row_tokens // seq_len)
            r = measure(config, seq_len, batch, args.min_tokens)
            print(f"| {name} | {seq_len:,} | {batch} | {r['tokens_s']:,.0f} | "
                  f"{r['batch_ms']:,.1f} | {r['batches']} | {r['packing']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
