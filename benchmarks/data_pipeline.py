"""Host pipeline throughput: tokens/s of `make_iterator` on the Shakespeare demo corpus (and synthetic ids).

    python benchmarks/data_pipeline.py --cache ~/.cache/llmjax [--seq-len 256] [--batch 8] [--batches 200]

Prints a table; the reference GPT train step on CPU consumes ~2,000 tokens/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from llmjax.data.config import DataConfig
from llmjax.data.corpus import shakespeare
from llmjax.data.pipeline import epoch_statistics, make_iterator
from llmjax.data.tokenizer import read_metadata, train_sentencepiece


def tokens_per_second(config: DataConfig, seq_len: int, batch: int, batches: int) -> tuple[float, float]:
    iterator = make_iterator(config, "lm", seq_len, batch, process_index=0, process_count=1)
    next(iterator)  # opens the source
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += int((next(iterator)["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - start
    return tokens / seconds, iterator.stats()["packing_efficiency"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/llmjax"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    train_files, validation_files = shakespeare(args.cache)
    work = tempfile.mkdtemp(prefix="llmjax-bench-")
    tokenizer_dir = os.path.join(work, "tok")
    train_sentencepiece(train_files, tokenizer_dir, args.vocab_size, model_type="bpe")
    print(f"tokenizer: BPE vocab {args.vocab_size} on {len(train_files)} plays in "
          f"{read_metadata(tokenizer_dir)['training_seconds']:.2f} s")

    rows = []
    for unit in ("paragraph", "file"):
        for workers in (0, 2):
            config = DataConfig(source="text", paths=train_files, validation_paths=validation_files,
                                document_unit=unit, data_dir=os.path.join(work, "tfds"), tokenizer=tokenizer_dir,
                                num_workers=workers)
            speed, efficiency = tokens_per_second(config, args.seq_len, args.batch, args.batches)
            rows.append((f"shakespeare/{unit}", workers, speed, efficiency))
        stats = epoch_statistics(config if unit == "file" else dataclasses.replace(config, num_workers=0),
                                 args.seq_len, progress=False)
        print(f"shakespeare/{unit}: one epoch = {stats['documents']} documents, {stats['tokens']} tokens, "
              f"{stats['rows']} rows, packing efficiency {stats['packing_efficiency']:.1%}")
    synthetic = DataConfig(source="synthetic", synthetic_vocab_size=args.vocab_size)
    speed, efficiency = tokens_per_second(synthetic, args.seq_len, args.batch, args.batches)
    rows.append(("synthetic ids", 0, speed, efficiency))

    print(f"\nseq_len {args.seq_len}, batch {args.batch}, {args.batches} batches")
    print(f"{'source':<24}{'workers':>8}{'tokens/s':>14}{'packing':>10}")
    for name, workers, speed, efficiency in rows:
        print(f"{name:<24}{workers:>8}{speed:>14,.0f}{efficiency:>10.1%}")


if __name__ == "__main__":
    main()
