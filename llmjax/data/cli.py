"""`llmjax tokenizer ...` and `llmjax data ...` subcommands (wired into llmjax/cli.py)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmjax.data.config import DataConfig
from llmjax.errors import ConfigError


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `tokenizer train`, `data prepare` and `data corpus shakespeare`."""
    tokenizer = subparsers.add_parser("tokenizer", help="train sentencepiece tokenizers")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer_commands.add_parser("train", help="train a sentencepiece model with llmjax's special tokens")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to train on")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="bpe", help="bpe trains ~30x faster")
    train.add_argument("--out", required=True, metavar="DIR", help="directory for spm.model and its metadata")
    train.add_argument("--character-coverage", type=float, default=0.9995,
                       help="share of characters given their own pieces; rarer ones use byte fallback")
    train.add_argument("--num-sentinels", type=int, default=100, help="number of T5 <extra_id_N> sentinels")
    train.set_defaults(handler=tokenizer_train)

    data = subparsers.add_parser("data", help="prepare datasets and the demo corpus")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="build local text files into a TFDS data_dir and print statistics")
    prepare.add_argument("--paths", nargs="+", required=True, metavar="GLOB", help="text files (globs)")
    prepare.add_argument("--validation-paths", nargs="*", default=[], metavar="GLOB", help="held-out files (globs)")
    prepare.add_argument("--validation-fraction", type=float, default=0.0, help="held-out share of documents")
    prepare.add_argument("--document-unit", choices=("file", "paragraph"), default="file")
    prepare.add_argument("--data-dir", required=True, help="TFDS data_dir to build into")
    prepare.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (for token counts)")
    prepare.add_argument("--seq-len", type=int, default=256, help="row length used for the packing efficiency")
    prepare.set_defaults(handler=data_prepare)

    corpus = data_commands.add_parser("corpus", help="fetch a demo corpus and print where its files are")
    corpus.add_argument("name", choices=("shakespeare",))
    corpus.add_argument("--cache", required=True, metavar="DIR", help="cache directory (reused on later calls)")
    corpus.set_defaults(handler=data_corpus)


def tokenizer_train(args: argparse.Namespace) -> int:
    """Train a tokenizer and print its special ids and timing."""
    from llmjax.data.tokenizer import read_metadata, train_sentencepiece

    tokenizer = train_sentencepiece(args.input, args.out, args.vocab_size, model_type=args.model_type,
                                    character_coverage=args.character_coverage, num_sentinels=args.num_sentinels)
    metadata = read_metadata(args.out)
    print(f"tokenizer: {args.out} ({args.model_type}, vocab {tokenizer.vocab_size}) trained in "
          f"{metadata['training_seconds']:.2f} s on {len(args.input)} file(s)")
    print("special ids:", json.dumps(dict(tokenizer.special_ids)))
    return 0


def data_prepare(args: argparse.Namespace) -> int:
    """Build the array_record dataset, then print documents, tokens and packing efficiency per split."""
    from llmjax.console import quiet_tfds
    from llmjax.data.pipeline import epoch_statistics
    from llmjax.data.sources import prepare_text_dataset, remote_version_dir
    from llmjax.data.tokenizer import load_tokenizer

    config = DataConfig(source="text", paths=list(args.paths), validation_paths=list(args.validation_paths),
                        validation_fraction=args.validation_fraction, document_unit=args.document_unit,
                        data_dir=args.data_dir, tokenizer=args.tokenizer, shuffle=False)
    config.validate()  # ConfigErrors naming the data.* key (reported as user errors)
    if args.seq_len < 4:
        raise ConfigError(f"--seq-len {args.seq_len} is too short; use at least 4 (e.g. the training seq_len).")
    tokenizer = load_tokenizer(args.tokenizer)  # before the build: a wrong path fails at once
    _check_inputs(config)
    quiet_tfds()
    start = time.perf_counter()
    builder, file_stats = prepare_text_dataset(config)
    stored = remote_version_dir(config.data_dir, str(builder.data_dir)) or builder.data_dir
    print(f"dataset: {stored} ({time.perf_counter() - start:.1f} s)")
    for split in ("train", "validation"):
        found = file_stats.get(split, {})
        if not found.get("documents"):
            print(f"{split}: no documents")
            continue
        stats = epoch_statistics(config, args.seq_len, split, tokenizer=tokenizer)
        print(f"{split}: {found['files']} files, {stats['documents']} documents, {found['characters']} characters, "
              f"{stats['tokens']} tokens ({stats['split_documents']} documents split over rows), "
              f"{stats['rows']} rows of {args.seq_len}, packing efficiency {stats['packing_efficiency']:.1%}")
        if found.get("skipped_empty_files"):
            print(f"  skipped {len(found['skipped_empty_files'])} empty file(s): {found['skipped_empty_files']}")
        if found.get("invalid_utf8_files"):
            print(f"  {len(found['invalid_utf8_files'])} file(s) with invalid UTF-8 "
                  f"({found['replaced_invalid_bytes']} bad byte runs replaced by U+FFFD): {found['invalid_utf8_files']}")
    return 0


def _check_inputs(config: DataConfig) -> None:
    """Every glob matches a file, and the training files hold some text (else one line naming them)."""
    from llmjax.data.sources import expand_globs
    from llmjax.data.tokenizer import has_text

    validation = expand_globs(config.validation_paths, "--validation-paths") if config.validation_paths else []
    train = [f for f in expand_globs(config.paths, "--paths") if f not in set(validation)]
    if not train:
        raise ConfigError("--paths matches only files that are also in --validation-paths; nothing is left to train on.")
    if not any(has_text(f) for f in train):
        shown = ", ".join(train[:5]) + (f" and {len(train) - 5} more" if len(train) > 5 else "")
        raise ConfigError(f"--paths files hold no text ({shown} {'is' if len(train) == 1 else 'are all'} empty or "
                          f"blank); pass UTF-8 text files.")


def data_corpus(args: argparse.Namespace) -> int:
    """Fetch (or reuse) the demo corpus and print where its training and held-out files are."""
    from llmjax.data.corpus import shakespeare, split_dirs

    train, validation = shakespeare(args.cache)
    train_dir, validation_dir = split_dirs(args.cache)
    print(f"shakespeare: {len(train)} training plays, {len(validation)} held-out plays")
    print(f"training files:  {train_dir}/*.txt")
    print(f"held-out files:  {validation_dir}/*.txt ({', '.join(Path(f).stem for f in validation)})")
    return 0
