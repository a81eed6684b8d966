"""Document sources: random-access sequences of records (dicts of fields).

Labelled CSV / TSV / JSONL files (`source: labelled`) are read directly: llmjax/data/labelled.py.

Three kinds, all read without TensorFlow:
- local text files, built once by a TFDS builder (`LlmjaxText`) into a
  data_dir as array_record and read back through `tfds.data_source`;
- any TFDS catalogue dataset prepared in a data_dir (array_record), by name;
- synthetic random token ids, for smoke tests and benchmarks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from llmjax import paths
from llmjax.data.config import DataConfig

log = logging.getLogger(__name__)

TEXT_BUILDER_NAME = "llmjax_text"
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v]*\n\s*")


class DocumentSource(Protocol):
    """Random access to records: len() and [index] -> dict of fields (text as str, labels as int)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


# ---------------------------------------------------------------- local text files


@dataclasses.dataclass
class TextStats:
    """What reading local text files found; skips are counted, never silent."""

    files: int = 0
    documents: int = 0
    characters: int = 0
    skipped_empty_files: list[str] = dataclasses.field(default_factory=list)
    invalid_utf8_files: list[str] = dataclasses.field(default_factory=list)  # kept, bad bytes replaced by U+FFFD
    replaced_invalid_bytes: int = 0


def expand_globs(patterns: Sequence[str], key: str = "data.paths") -> list[str]:
    """Sorted, de-duplicated files matched by `patterns` (local or gs://); a pattern matching no file is an error."""
    files: list[str] = []
    for pattern in patterns:
        matched = paths.glob(pattern, key)
        if not matched:
            raise FileNotFoundError(f"{key} pattern {pattern!r} matches no file; fix the glob or create the files.")
        files.extend(matched)
    return sorted(set(files))


def read_text_file(path: str, stats: TextStats) -> str:
    """The file as text: UTF-8 (BOM stripped, CRLF -> LF); invalid bytes become U+FFFD and are counted."""
    raw = paths.resolve(path, check_bucket=False).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        text = raw.decode("utf-8-sig", errors="replace")
        bad = text.count("\ufffd") - raw.decode("utf-8-sig", errors="ignore").count("\ufffd")
        stats.invalid_utf8_files.append(path)
        stats.replaced_invalid_bytes += bad
        log.warning("%s is not valid UTF-8 (first bad byte at offset %d); %d bad byte run(s) replaced by U+FFFD.",
                    path, error.start, bad)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_documents(text: str, unit: str) -> list[str]:
    """Documents of one file: the whole file, or its blank-line-separated paragraphs; empty ones dropped."""
    if unit == "file":
        return [text] if text.strip() else []
    if unit == "paragraph":
        return [block for block in _PARAGRAPH_BREAK.split(text) if block.strip()]
    raise ValueError(f"document_unit={unit!r} is not 'file' or 'paragraph'.")


def iter_documents(files: Sequence[str], unit: str, stats: TextStats):
    """Yield (key, path, text) for every document of `files`, counting what was skipped."""
    for path in files:
        stats.files += 1
        documents = split_documents(read_text_file(path, stats), unit)
        if not documents:
            stats.skipped_empty_files.append(path)
            log.warning("%s holds no text; skipped.", path)
        for index, document in enumerate(documents):
            stats.documents += 1
            stats.characters += len(document)
            yield f"{path}#{index}", path, document


def _document_hash(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def split_by_fraction(keys: Sequence[str], fraction: float) -> set[str]:
    """Keys held out for validation: a fixed pseudo-random `fraction` (at least one when fraction > 0)."""
    if fraction <= 0 or len(keys) < 2:
        return set()
    count = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    return set(sorted(keys, key=_document_hash)[:count])


def _fingerprint(files: Sequence[str]) -> list[list[Any]]:
    return [[f, *paths.signature(f)] for f in files]


def _text_builder_class():
    """The TFDS builder class (defined lazily so importing llmjax.data does not import TFDS)."""
    global _TEXT_BUILDER
    if _TEXT_BUILDER is not None:
        return _TEXT_BUILDER
    import tensorflow_datasets as tfds

    @dataclasses.dataclass(eq=False)
    class TextConfig(tfds.core.BuilderConfig):
        train_files: tuple[str, ...] = ()
        validation_files: tuple[str, ...] = ()
        document_unit: str = "file"
        validation_fraction: float = 0.0

    class LlmjaxText(tfds.core.GeneratorBasedBuilder):
        """Local UTF-8 text files as a TFDS dataset with features text (str) and path (str)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Documents from local text files."}
        code_path = None  # no checksums file next to the code; avoids TFDS probing the package layout

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Local text files prepared by llmjax.",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            config = self.builder_config
            stats = {"train": TextStats(), "validation": TextStats()}
            train = list(iter_documents(config.train_files, config.document_unit, stats["train"]))
            validation = list(iter_documents(config.validation_files, config.document_unit, stats["validation"]))
            held_out = split_by_fraction([key for key, _, _ in train], config.validation_fraction)
            if held_out:
                validation = [d for d in train if d[0] in held_out]
                train = [d for d in train if d[0] not in held_out]
            for split, documents in (("train", train), ("validation", validation)):
                stats[split].documents = len(documents)
                stats[split].characters = sum(len(text) for _, _, text in documents)
            self.info.metadata["stats"] = {split: dataclasses.asdict(s) for split, s in stats.items()}
            if not train:
                raise ValueError(f"no training documents in {len(config.train_files)} file(s) "
                                 f"(empty: {stats['train'].skipped_empty_files}); check data.paths.")
            splits = {"train": self._generate_examples(train)}
            if validation:  # TFDS cannot write an empty split
                splits["validation"] = self._generate_examples(validation)
            return splits

        def _generate_examples(self, documents):
            for key, path, text in documents:
                yield key, {"text": text, "path": path}

    _TEXT_BUILDER = (LlmjaxText, TextConfig)
    return _TEXT_BUILDER


_TEXT_BUILDER = None


def text_builder(config: DataConfig):
    """The TFDS builder of `config`'s text files in `config.data_dir` (not yet prepared).

    The builder config name hashes the file list (paths, sizes, mtimes), the
    document unit and the split, so changed inputs build a new dataset. For a
    data_dir on object storage the builder works in its local mirror
    (`paths.mirror_path`): array_record reads and writes only local files.
    """
    builder_class, config_class = _text_builder_class()
    validation_files = expand_globs(config.validation_paths, "data.validation_paths") if config.validation_paths else []
    train_files = [f for f in expand_globs(config.paths) if f not in set(validation_files)]
    if not train_files:
        raise ValueError("data.paths matches only files that are also in data.validation_paths; nothing is left to train on.")
    key = json.dumps([_fingerprint(train_files), _fingerprint(validation_files), config.document_unit,
                      config.validation_fraction if not validation_files else 0.0])
    name = f"{config.document_unit}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    builder_config = config_class(
        name=name, description=f"{len(train_files)} train / {len(validation_files)} validation file(s)",
        train_files=tuple(train_files), validation_files=tuple(validation_files),
        document_unit=config.document_unit,
        validation_fraction=0.0 if validation_files else config.validation_fraction,
    )
    paths.resolve(config.data_dir, "data.data_dir")  # scheme, bucket, credentials
    local_dir = paths.mirror_path(config.data_dir)
    os.makedirs(local_dir, exist_ok=True)
    with _quiet_absl():  # TFDS logs the whole custom config (every file name) at WARNING
        return builder_class(config=builder_config, data_dir=local_dir, file_format="array_record")


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def prepare_text_dataset(config: DataConfig) -> tuple[Any, dict[str, Any]]:
    """Build (once) the array_record dataset for `config`'s text files; returns (builder, per-split stats)."""
    builder = text_builder(config)
    remote = remote_version_dir(config.data_dir, str(builder.data_dir))
    if not builder.is_prepared() and remote and paths.resolve(remote).joinpath("dataset_info.json").exists():
        paths.local_copy(remote, "data.data_dir")  # prepared on another host: fetch it
        builder = text_builder(config)
    if not builder.is_prepared():
        builder.download_and_prepare()
        if remote:
            paths.upload(builder.data_dir, remote, "data.data_dir")
        builder = text_builder(config)  # re-read info (metadata) from disk
    return builder, dict(builder.info.metadata.get("stats", {}))


def remote_version_dir(data_dir: str, local_version_dir: str) -> str | None:
    """The object-storage twin of a dataset version directory in data_dir's local mirror
    (None for a local data_dir)."""
    if not paths.is_remote(data_dir):
        return None
    relative = os.path.relpath(local_version_dir, paths.mirror_path(data_dir)).replace(os.sep, "/")
    return paths.join(data_dir, relative)


# ---------------------------------------------------------------- TFDS datasets


class TfdsSource:
    """A prepared TFDS split read through `tfds.data_source`: bytes fields decoded to str."""

    def __init__(self, data_source: Any, description: str):
        self._data = data_source
        self.description = description

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self._data[int(index)].items()}

    def __repr__(self) -> str:
        return f"TfdsSource({self.description}, {len(self)} records)"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_data_dir(data_dir: str) -> None:
    if paths.is_remote(paths.check(data_dir, "data.data_dir")):
        paths.resolve(data_dir, "data.data_dir")  # bucket and credentials
    elif not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data.data_dir {data_dir!r} does not exist; set it to the directory holding prepared TFDS datasets "
            "(for local text, `llmjax data prepare` creates it)."
        )


def _has_tensorflow() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def open_tfds(name: str, data_dir: str, split: str, fields: Sequence[str] = ()) -> TfdsSource:
    """Random access to split `split` of TFDS dataset `name` prepared in `data_dir`; never downloads.

    Raises a message naming the fix when the data_dir is missing, the name is
    unknown, the dataset is not prepared, a field is missing, or the dataset is
    stored as tfrecord (which needs TensorFlow and a one-off conversion).
    """
    import tensorflow_datasets as tfds

    _check_data_dir(data_dir)
    if paths.is_remote(data_dir):
        data_dir = _local_tfds_dir(name, data_dir)
    base = name.split("/")[0].split(":")[0]
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"TFDS has no dataset {name!r} and {data_dir!r} holds none by that name.{hint} "
                         "Set data.name to a catalogue name (e.g. 'lm1b', 'c4/en').") from error
    except ValueError as error:
        raise ValueError(f"TFDS cannot open {name!r} in {data_dir!r}: {error}") from error
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (version {builder.version}) is not prepared in {data_dir!r}; llmjax never downloads "
            f"at run time. Prepare it where there is internet with `tfds build {name} --data_dir {data_dir} "
            "--file_format array_record` (or copy a prepared copy there)."
        )
    formats = {f.value for f in builder.info.available_file_formats()}
    if not formats & set(RANDOM_ACCESS_FORMATS):
        tf_hint = ("TensorFlow is installed, so " if _has_tensorflow()
                   else "TensorFlow is not installed (pip install 'llmjax[tf]' i.e. tensorflow-cpu); then ")
        raise RuntimeError(
            f"TFDS dataset {name!r} in {data_dir!r} is stored as {sorted(formats)}, which has no random access and "
            f"needs TensorFlow to read. {tf_hint}convert it once with `tfds convert_format --dataset_dir "
            f"{builder.data_dir} --out_file_format array_record`, or rebuild it with --file_format array_record."
        )
    splits = list(builder.info.splits)
    split_base = re.split(r"[\[+]", split)[0]
    if split_base not in splits:
        raise ValueError(f"TFDS dataset {name!r} has no split {split_base!r}; it has {splits}. Set data.train_split / "
                         "data.validation_split accordingly.")
    features = getattr(builder.info.features, "keys", lambda: [])()
    missing = [f for f in fields if f not in features]
    if missing:
        raise ValueError(f"TFDS dataset {name!r} has no field(s) {missing}; its fields are {sorted(features)}. "
                         "Set data.text_field / input_field / target_field / label_field to one of them.")
    return TfdsSource(builder.as_data_source(split=split), f"{name}[{split}] in {data_dir}")


def _local_tfds_dir(name: str, data_dir: str) -> str:
    """The local mirror of a data_dir on object storage holding dataset `name` (its version
    directory downloaded once): array_record has no random access over object storage."""
    import tensorflow_datasets as tfds

    with _quiet_absl():
        version_dir = str(tfds.builder(name, data_dir=data_dir).data_dir)
    if paths.resolve(version_dir).joinpath("dataset_info.json").exists():
        paths.local_copy(version_dir, "data.data_dir")
    return paths.mirror_path(data_dir)


# ---------------------------------------------------------------- synthetic


class SyntheticSource:
    """Deterministic random documents of token ids (no tokenizer needed).

    Record i holds `text` (ids, 16..512 long), `input`/`target` (ids) and a
    learnable `label` (the parity of the first input id).
    """

    def __init__(self, num_documents: int, vocab_size: int, first_id: int, seed: int):
        if vocab_size <= first_id + 1:
            raise ValueError(f"synthetic vocab_size={vocab_size} leaves no ids above the {first_id} special ids.")
        self.num_documents, self.vocab_size, self.first_id, self.seed = num_documents, vocab_size, first_id, seed

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_documents:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        def ids(low: int, high: int) -> list[int]:
            return rng.integers(self.first_id, self.vocab_size, int(rng.integers(low, high))).tolist()
        text, inputs, target = ids(16, 513), ids(4, 65), ids(2, 33)
        return {"text": text, "input": inputs, "target": target, "label": inputs[0] % 2}


# ---------------------------------------------------------------- dispatch


def open_source(config: DataConfig, split: str, fields: Sequence[str] = (), first_id: int = 107,
                vocab_size: int | None = None) -> DocumentSource:
    """The documents of `split` ("train" or "validation") for `config.source`."""
    if split not in ("train", "validation"):
        raise ValueError(f"split {split!r} is not 'train' or 'validation'.")
    if config.source == "synthetic":
        return SyntheticSource(config.synthetic_num_documents, vocab_size or config.synthetic_vocab_size, first_id,
                               seed=config.seed * 2 + (split == "validation"))
    if config.source == "text":
        builder, _ = prepare_text_dataset(config)
        data = builder.as_data_source(split=split) if split in builder.info.splits else []
        if len(data) == 0:
            raise ValueError(
                f"the {split} split of the local text dataset is empty; set data.validation_paths or "
                "data.validation_fraction > 0 to hold out validation documents."
            )
        return TfdsSource(data, f"text[{split}] in {config.data_dir}")
    if config.source == "tfds":
        tfds_split = config.train_split if split == "train" else config.validation_split
        return open_tfds(config.name, config.data_dir, tfds_split, fields)
    if config.source == "labelled":
        from llmjax.data.labelled import open_labelled

        return open_labelled(config, split)
    if config.source == "preference":
        from llmjax.data.preference import open_preference

        return open_preference(config, split)
    if config.source == "chat":
        from llmjax.data.chat import open_chat

        return open_chat(config, split)
    raise ValueError(f"data.source={config.source!r} is not one of synthetic, text, tfds, labelled, preference, chat.")
