"""DataConfig: the typed `data:` section of an experiment YAML.

Sequence length and global batch size are not here: they belong to the model
and train sections and are passed to `make_iterator` as arguments.
"""
from __future__ import annotations

import dataclasses

from llmjax.errors import ConfigError

SOURCES = ("synthetic", "text", "tfds", "labelled")
DOCUMENT_UNITS = ("file", "paragraph")


@dataclasses.dataclass
class DataConfig:
    """Where the text comes from and how it becomes batches."""

    # "synthetic" (random token ids), "text" (local files), "tfds" (catalogue dataset) or
    # "labelled" (local CSV / TSV / JSONL files of text + label columns, for classification)
    source: str = "synthetic"
    train_files: list[str] = dataclasses.field(default_factory=list)  # globs of labelled files (source=labelled)
    validation_files: list[str] = dataclasses.field(default_factory=list)  # held-out labelled files (source=labelled)
    paths: list[str] = dataclasses.field(default_factory=list)  # globs of local UTF-8 text files (source=text)
    validation_paths: list[str] = dataclasses.field(default_factory=list)  # globs held out as validation (source=text)
    validation_fraction: float = 0.0  # fraction of documents held out when validation_paths is empty (source=text)
    document_unit: str = "file"  # "file": one document per file; "paragraph": per blank-line-separated block
    name: str = ""  # TFDS catalogue name, e.g. "c4/en", "lm1b", "wikipedia/20230601.en" (source=tfds)
    data_dir: str = ""  # TFDS data_dir holding prepared datasets (local path or gs://); text source builds into it
    train_split: str = "train"  # TFDS split used for training (TFDS split syntax, e.g. "train[:90%]")
    validation_split: str = "validation"  # TFDS split used for evaluation
    text_field: str = "text"  # feature holding the document text (lm, nsp)
    input_field: str = ""  # feature holding the input / prompt text (seq2seq, sft) or the text to classify
    target_field: str = ""  # feature holding the target / response text (seq2seq, sft)
    label_field: str = ""  # feature / column holding the class label (classification; labelled default "label")
    pair_field: str = ""  # optional second text of a pair: [CLS] text [SEP] pair [SEP] (classification)
    # Maps string labels to ids 0..n-1 (classification). Empty with source=labelled: the sorted
    # labels of data.train_files, filled in when the config is validated (so the run stores them).
    label_names: list[str] = dataclasses.field(default_factory=list)
    max_segments: int = 0  # classification rows packed with pack=true: at most this many examples per row (0: seq_len // 8)
    tokenizer: str = ""  # directory of a tokenizer written by `llmjax tokenizer train`
    pack: bool = True  # pack several documents / examples per row (lm, sft, classification); False: one per row, padded
    shuffle: bool = True  # shuffle documents each epoch (training split only)
    seed: int = 0  # seed of the document shuffle
    num_workers: int = 0  # 0: tokenize in the calling thread; N > 0: N threads tokenize rows in parallel
    add_eos: bool = True  # append the tokenizer's eos id to every document / target (lm, seq2seq, sft)
    synthetic_vocab_size: int = 1024  # vocabulary of random token ids when source=synthetic and no tokenizer is set
    synthetic_num_documents: int = 10000  # number of random documents per epoch when source=synthetic

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the key, its value and the fix for the first bad setting."""
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r} is not one of {SOURCES}; set data.source to one of them.")
        if self.document_unit not in DOCUMENT_UNITS:
            raise ConfigError(
                f"data.document_unit={self.document_unit!r} is not one of {DOCUMENT_UNITS}; "
                "use 'file' for one document per file or 'paragraph' for blank-line-separated blocks."
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"data.validation_fraction={self.validation_fraction} must be in [0, 1); e.g. 0.05 holds out 5% of documents."
            )
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0 (0 tokenizes in the calling thread).")
        if self.source == "text":
            if not self.paths:
                raise ConfigError("data.paths is empty but data.source='text'; set data.paths to globs of text files, e.g. ['corpus/*.txt'].")
            if not self.data_dir:
                raise ConfigError("data.data_dir is empty but data.source='text'; set it to a directory where the prepared dataset is written.")
            if not self.tokenizer:
                raise ConfigError("data.tokenizer is empty but data.source='text'; train one with `llmjax tokenizer train` and set its directory.")
        if self.source == "tfds":
            if not self.name:
                raise ConfigError("data.name is empty but data.source='tfds'; set a TFDS catalogue name such as 'lm1b' or 'c4/en'.")
            if not self.data_dir:
                raise ConfigError("data.data_dir is empty but data.source='tfds'; set the TFDS data_dir where the dataset is prepared.")
            if not self.tokenizer:
                raise ConfigError("data.tokenizer is empty but data.source='tfds'; train one with `llmjax tokenizer train` and set its directory.")
        if self.max_segments < 0:
            raise ConfigError(f"data.max_segments={self.max_segments} must be >= 0 (0: seq_len // 8).")
        if self.source == "labelled":
            if not self.train_files:
                raise ConfigError("data.train_files is empty but data.source='labelled'; set it to CSV / TSV / JSONL "
                                 "files with a text and a label column, e.g. data.train_files=[train.csv].")
            if not self.tokenizer:
                raise ConfigError("data.tokenizer is empty but data.source='labelled'; set the model's tokenizer "
                                 "directory (or train one with `llmjax tokenizer train`).")
            from llmjax.data.labelled import check_labelled

            check_labelled(self)  # reads the files once (cached): label names, columns, rows
        if self.synthetic_vocab_size < 16:
            raise ConfigError(f"data.synthetic_vocab_size={self.synthetic_vocab_size} must be >= 16.")
        if self.synthetic_num_documents < 1:
            raise ConfigError(f"data.synthetic_num_documents={self.synthetic_num_documents} must be >= 1.")


def fields_for_kind(config: DataConfig, kind: str) -> dict[str, str]:
    """The record fields a batch kind reads, checked to be set; raises ConfigError naming the missing key."""
    if kind in ("lm", "nsp"):
        return {"text": config.text_field}
    if kind in ("seq2seq", "sft"):
        missing = [k for k in ("input_field", "target_field") if not getattr(config, k)]
        if missing:
            raise ConfigError(
                f"batch kind {kind!r} needs data.{' and data.'.join(missing)}; set them to the record fields holding "
                "the input (prompt) and target (response) text."
            )
        return {"input": config.input_field, "target": config.target_field}
    if kind == "classification":
        label = config.label_field or ("label" if config.source == "labelled" else "")
        if not label:
            raise ConfigError("batch kind 'classification' needs data.label_field; set it to the record field holding the label.")
        fields = {"input": config.input_field or config.text_field, "label": label}
        if config.pair_field:
            fields["pair"] = config.pair_field
        return fields
    raise ConfigError(f"unknown batch kind {kind!r}; use one of lm, nsp, seq2seq, sft, classification.")

