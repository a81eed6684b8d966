"""Tokenizers: a small interface, sentencepiece models with stable special ids, and the
tokenizers of imported models (HF tokenizer.json, plain sentencepiece models) behind it.
llmjax's one tokenizer loader: llmjax.convert uses it, never the reverse.

Every llmjax tokenizer puts the special tokens the objectives need at the
front of the vocabulary, always at the same ids, so objectives can hard-wire
nothing and still agree with the data:

    pad=0 unk=1 bos=2 eos=3 [MASK]=4 [CLS]=5 [SEP]=6 <extra_id_0>.. at 7..

The ids are written to `tokenizer.json`-free metadata (`llmjax_tokenizer.json`)
next to the model file, and checked against the model when it is loaded.

Imported models' tokenizers (the second half of this module): `HFTokenizer` wraps an HF
`tokenizer.json` (the `tokenizers` library); `SentencePieceModelTokenizer` wraps a plain
sentencepiece model (T5's spiece.model, LLaMA's tokenizer.model). Both give encode(text) -> ids
(no special tokens), decode(ids) -> text, vocab_size and special_ids, a mapping from role (pad,
unk, bos, eos, mask, cls, sep) to the model's own ids: imported vocabularies keep their ids,
they are not renumbered. `load_any_tokenizer(directory)` picks whichever a directory holds.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import sentencepiece as spm

from llmjax import paths
from llmjax.data.chat_template import render_chat_template
from llmjax.errors import ConfigError, ConversionError

METADATA_FILE = "llmjax_tokenizer.json"
SENTENCEPIECE_MODEL_FILE = "spm.model"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MASK, CLS, SEP = "[MASK]", "[CLS]", "[SEP]"
NUM_FIXED_SPECIALS = 7  # pad, unk, bos, eos, mask, cls, sep
BYTE_PIECES = 256


def sentinel(index: int) -> str:
    """The T5 sentinel piece number `index` (`<extra_id_0>`, ...)."""
    return f"<extra_id_{index}>"


@dataclasses.dataclass(frozen=True)
class SpecialTokens(Mapping[str, int]):
    """Special token ids; a read-only mapping with keys pad, unk, bos, eos, mask, cls, sep,
    sentinel_start, num_sentinels, num_special."""

    pad: int = 0
    unk: int = 1
    bos: int = 2
    eos: int = 3
    mask: int = 4
    cls: int = 5
    sep: int = 6
    sentinel_start: int = 7
    num_sentinels: int = 100

    @property
    def num_special(self) -> int:
        """Ids below this are special tokens (never produced from text by byte fallback or merges)."""
        return self.sentinel_start + self.num_sentinels

    def sentinel(self, index: int) -> int:
        """Id of `<extra_id_{index}>`."""
        if not 0 <= index < self.num_sentinels:
            raise ValueError(f"sentinel index {index} out of range; this tokenizer has {self.num_sentinels} sentinels.")
        return self.sentinel_start + index

    def _as_dict(self) -> dict[str, int]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "num_special": self.num_special}

    def __getitem__(self, key: str) -> int:
        return self._as_dict()[key]

    def __iter__(self):
        return iter(self._as_dict())

    def __len__(self) -> int:
        return len(self._as_dict())


class Tokenizer(abc.ABC):
    """What the pipeline and generation need from a tokenizer."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts; subclasses may do this faster than one by one."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special tokens other than sentinels/[MASK]/... render as nothing)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    @abc.abstractmethod
    def special_ids(self) -> SpecialTokens:
        """The stable special token ids."""


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model trained by `train_sentencepiece` (special ids checked on load)."""

    def __init__(self, model_file: str | os.PathLike, special: SpecialTokens):
        self.model_file = str(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self._special = special
        _check_special_ids(self._sp, special, self.model_file)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id (for debugging and display)."""
        return self._sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_ids(self) -> SpecialTokens:
        return self._special


def _check_special_ids(sp: spm.SentencePieceProcessor, special: SpecialTokens, where: str) -> None:
    expected = {PAD: special.pad, UNK: special.unk, BOS: special.bos, EOS: special.eos,
                MASK: special.mask, CLS: special.cls, SEP: special.sep}
    expected.update({sentinel(i): special.sentinel(i) for i in range(special.num_sentinels)})
    for piece, want in expected.items():
        got = sp.piece_to_id(piece)
        if got != want:
            raise ValueError(
                f"tokenizer {where}: piece {piece!r} has id {got}, expected {want}; "
                "the model was not trained by llmjax or its metadata is stale. Retrain with `llmjax tokenizer train`."
            )


def train_sentencepiece(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    num_sentinels: int = 100,
    exact_round_trip: bool = True,
    max_sentences: int = 2_000_000,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model on text files and write it with its metadata into `out_dir`.

    exact_round_trip keeps text as is (no NFKC, no whitespace squashing, no
    dummy prefix) so decode(encode(text)) == text; byte fallback covers any
    character outside `character_coverage` (Chinese needs ~0.9995).
    """
    if model_type not in ("bpe", "unigram"):
        raise ConfigError(f"model_type={model_type!r} is not supported; use 'bpe' (fast) or 'unigram'.")
    if paths.is_remote(paths.check(out_dir, "--out")) or any(paths.is_remote(paths.check(p, "--input"))
                                                             for p in inputs):
        # sentencepiece reads and writes local files only: train on local copies, upload the result
        local_inputs = [paths.local_copy(p, "--input") for p in inputs]
        with paths.staged_output(out_dir, "--out") as staging:
            train_sentencepiece(local_inputs, staging, vocab_size, model_type, character_coverage,
                                num_sentinels, exact_round_trip, max_sentences)
        return load_tokenizer(out_dir)
    files = [pathlib.Path(p).expanduser() for p in inputs]
    if not files:
        raise ConfigError("no tokenizer training input given; pass text files to --input.")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ConfigError(f"tokenizer training input not found: {', '.join(missing)}; "
                          f"pass existing text files to --input.")
    if num_sentinels < 0:
        raise ConfigError(f"num_sentinels={num_sentinels} must be >= 0 (T5's span corruption uses 100).")
    if not 0.98 <= character_coverage <= 1.0:  # sentencepiece's own bounds
        raise ConfigError(f"character_coverage={character_coverage} must be in [0.98, 1]; rarer characters "
                          f"than the coverage go through byte fallback.")
    special = SpecialTokens(num_sentinels=num_sentinels)
    minimum = vocab_size_floor(num_sentinels)
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: {special.num_special} special tokens and {BYTE_PIECES} byte pieces "
            f"need at least {minimum}; use e.g. {max(1000, minimum)}."
        )
    files = [p for p in files if has_text(p)]  # sentencepiece fails on a corpus of no text
    if not files:
        raise ConfigError(f"tokenizer training input has no text: {', '.join(map(str, inputs))} "
                          f"{'is' if len(inputs) == 1 else 'are all'} empty or blank; pass UTF-8 "
                          f"text files to --input.")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / SENTENCEPIECE_MODEL_FILE.removesuffix(".model")
    user_symbols = [MASK, CLS, SEP] + [sentinel(i) for i in range(num_sentinels)]
    options: dict[str, Any] = dict(
        input=[str(p) for p in files],
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        pad_id=special.pad, unk_id=special.unk, bos_id=special.bos, eos_id=special.eos,
        pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        user_defined_symbols=user_symbols,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 16,
        train_extremely_large_corpus=False,
        minloglevel=2,
    )
    if exact_round_trip:
        options.update(normalization_rule_name="identity", remove_extra_whitespaces=False,
                       add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_by_whitespace=True)
    start = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as error:
        raise _training_error(error, vocab_size, files, num_sentinels) from None
    seconds = time.perf_counter() - start
    model_file = out / SENTENCEPIECE_MODEL_FILE
    tokenizer = SentencePieceTokenizer(model_file, special)
    metadata = {
        "kind": "sentencepiece",
        "model_file": SENTENCEPIECE_MODEL_FILE,
        "model_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
        "vocab_size": tokenizer.vocab_size,
        "model_type": model_type,
        "character_coverage": character_coverage,
        "byte_fallback": True,
        "exact_round_trip": exact_round_trip,
        "special_ids": dict(special),
        "special_pieces": {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS, "mask": MASK, "cls": CLS, "sep": SEP,
                           "sentinel_format": "<extra_id_{}>"},
        "trained_on": [str(p) for p in files],
        "training_seconds": round(seconds, 3),
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenizer


def vocab_size_floor(num_sentinels: int = 100) -> int:
    """The smallest vocabulary: the special tokens, 256 byte pieces and one learned piece."""
    return SpecialTokens(num_sentinels=num_sentinels).num_special + BYTE_PIECES + 1


def has_text(path: str | os.PathLike, chunk: int = 1 << 16) -> bool:
    """Whether a file holds anything but whitespace (reads only up to the first such byte)."""
    with paths.resolve(path, check_bucket=False).open("rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def _training_error(error: RuntimeError, vocab_size: int, files: Sequence[pathlib.Path],
                    num_sentinels: int) -> ConfigError:
    """sentencepiece's C++ failure as a one-line error naming the input and the fix."""
    names = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    ceiling = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(error))
    if ceiling:
        return ConfigError(
            f"--vocab-size {vocab_size} is more than sentencepiece can learn from {names}: that text yields at most "
            f"{ceiling.group(2)} pieces; use --vocab-size {ceiling.group(2)}"
            f"{' or less' if int(ceiling.group(2)) > vocab_size_floor(num_sentinels) else ''}, or train on more text.")
    chars = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(error))
    if chars:
        return ConfigError(
            f"--vocab-size {vocab_size} is too small for the characters of {names}: special tokens, byte pieces and "
            f"the text's characters need {chars.group(2)}; use --vocab-size {chars.group(2)} or more, or lower "
            f"--character-coverage (rare characters then go through byte fallback).")
    detail = " ".join(str(error).split())
    return ConfigError(f"sentencepiece training failed for --vocab-size {vocab_size} on {names}: {detail}")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer in `directory` (as written by `train_sentencepiece`), checking its special ids."""
    path = pathlib.Path(paths.local_copy(directory, "tokenizer"))  # a gs:// one is fetched once
    meta_file = path / METADATA_FILE
    if not meta_file.is_file() and path.is_dir():
        imported = _imported_tokenizer(path)  # an HF tokenizer.json or sentencepiece model
        if imported is not None:
            return imported
    if not meta_file.is_file():
        what = "does not exist" if not path.exists() else (
            f"holds neither an llmjax tokenizer ({METADATA_FILE}) nor an imported one (tokenizer.json, spiece.model, "
            f"tokenizer.model, vocab.txt)")
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} {what}; train one with "
                          f"`llmjax tokenizer train --input FILES --vocab-size N --out {directory}`.")
    metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    if not isinstance(metadata, dict):
        raise ConfigError(f"{meta_file}: expected a JSON object, got {type(metadata).__name__}")
    kind = metadata.get("kind")
    if kind != "sentencepiece":
        raise ValueError(f"{meta_file}: tokenizer kind {kind!r} is not supported; supported: 'sentencepiece'.")
    return SentencePieceTokenizer(_model_file(path, metadata, meta_file),
                                  _metadata_special_ids(metadata, meta_file))


def _model_file(path: pathlib.Path, metadata: dict, meta_file: pathlib.Path) -> pathlib.Path:
    """metadata["model_file"], which must name a file beside the metadata: a path (`..`,
    absolute, a subdirectory) would let a downloaded tokenizer read any file on the machine."""
    name = metadata.get("model_file")
    if not isinstance(name, str) or not name or name in (".", "..") or \
            pathlib.PurePath(name).name != name or "\\" in name:
        raise ConfigError(f"{meta_file}: model_file must be a plain file name in {path}, "
                          f"got {name!r}")
    return path / name


def _metadata_special_ids(metadata: dict, meta_file: pathlib.Path) -> SpecialTokens:
    ids = metadata.get("special_ids")
    fields = {f.name for f in dataclasses.fields(SpecialTokens)}
    if not isinstance(ids, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids.values()):
        raise ConfigError(f"{meta_file}: special_ids must map token roles to non-negative "
                          f"integer ids, got {ids!r}")
    unknown = set(ids) - fields - {"num_special"}
    if unknown:
        raise ConfigError(f"{meta_file}: unknown special_ids {sorted(unknown)}; known: "
                          f"{sorted(fields)}")
    return SpecialTokens(**{k: v for k, v in ids.items() if k != "num_special"})


class _ImportedTokenizer(Tokenizer):
    """An imported model's tokenizer (HF tokenizer.json, sentencepiece) with its special ids
    as SpecialTokens, so the data pipeline and objectives can use it like llmjax's own."""

    def __init__(self, inner: Any):
        self.inner = inner
        ids = dict(inner.special_ids)
        fallback = ids.get("unk", ids.get("pad", ids.get("eos", 0)))
        roles = {role: int(ids.get(role, fallback)) for role in
                 ("pad", "unk", "bos", "eos", "mask", "cls", "sep")}
        roles["pad"] = int(ids.get("pad", 0))
        # Ids below `leading` are special when the vocabulary keeps its specials in front
        # (LLaMA-style, BERT's [PAD]..[MASK]); never more than a few hundred.
        front = [i for i in ids.values() if i < 1000]
        leading = max(front) + 1 if front else 0
        self._special = SpecialTokens(**roles, sentinel_start=leading, num_sentinels=0)
        self.path = getattr(inner, "path", None)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def special_ids(self) -> SpecialTokens:
        return self._special

    def __getattr__(self, name: str) -> Any:  # chat templates, token_to_id, ...
        return getattr(self.inner, name)


def _imported_tokenizer(path: pathlib.Path) -> "Tokenizer | None":
    if not any((path / name).exists() for name in
               ("tokenizer.json", "spiece.model", "tokenizer.model", "vocab.txt")):
        return None
    inner = load_any_tokenizer(path)
    return None if inner is None else _ImportedTokenizer(inner)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata JSON of a tokenizer directory (local or gs://)."""
    directory = paths.local_copy(directory, "tokenizer")
    return json.loads((pathlib.Path(directory) / METADATA_FILE).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------
# Tokenizers of imported models (HF tokenizer.json, plain sentencepiece models).

ROLES = ("pad", "unk", "bos", "eos", "mask", "cls", "sep")
# Common spellings, tried when tokenizer_config.json names no token for a role.
GUESSES = {
    "pad": ("[PAD]", "<pad>", "<|endoftext|>"), "unk": ("[UNK]", "<unk>", "<|endoftext|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<|endoftext|>", "<|im_start|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"),
    "mask": ("[MASK]", "<mask>"), "cls": ("[CLS]",), "sep": ("[SEP]",),
}


class SpecialIds(dict):
    """Role -> id for the roles this vocabulary has; also readable as attributes."""

    def __getattr__(self, name: str) -> int:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"this tokenizer has no {name!r} token; it has "
                                 f"{sorted(self)}") from None


def _token_string(value) -> Optional[str]:
    if isinstance(value, dict):  # {"content": "...", ...} in tokenizer_config.json
        return value.get("content")
    return value if isinstance(value, str) else None


def read_json_object(path: Path) -> dict:
    """A JSON object file (config.json, tokenizer_config.json, ...) or a one-line ConversionError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:
        raise ConversionError(f"{path}: not valid JSON ({str(err)[:200]})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _special_ids(lookup, directory: Optional[Path], extra: Optional[Mapping[str, str]] = None,
                 guess: bool = True) -> SpecialIds:
    named: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name if directory else None
        if path is not None and path.exists():
            data = read_json_object(path)
            for role in ROLES:
                token = _token_string(data.get(f"{role}_token"))
                if token is not None:
                    named.setdefault(role, token)
    named.update(extra or {})
    ids = SpecialIds()
    for role in ROLES:
        candidates = ([named[role]] if role in named else []) + (
            list(GUESSES[role]) if guess and role not in named else [])
        for token in candidates:
            token_id = lookup(token)
            if token_id is not None:
                ids[role] = int(token_id)
                break
    return ids


class HFTokenizer(Tokenizer):
    """An HF fast tokenizer (tokenizer.json) with llmjax's interface."""

    def __init__(self, path: str | os.PathLike, special_tokens: Optional[Mapping[str, str]] = None):
        from tokenizers import Tokenizer as FastTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no tokenizer.json")
        self.path = file
        try:
            self._tok = FastTokenizer.from_file(str(file))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise ConversionError(f"{file}: not a readable tokenizer.json "
                                  f"({' '.join(str(err).split())[:200]})") from None
        self._tok.no_padding()  # encode gives exactly the text's ids; batching pads later
        self._tok.no_truncation()
        directory = file.parent
        self._special = _special_ids(self._tok.token_to_id, directory, special_tokens)
        config = directory / "tokenizer_config.json"
        self.config = read_json_object(config) if config.exists() else {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; with add_special_tokens, the model's template ([CLS] .. [SEP])."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, [start, end) character offsets of each token) of `text` (chat loss masks)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_pair(self, text: str, pair: Optional[str] = None) -> tuple[list[int], list[int]]:
        """(ids, token type ids) with the model's special tokens, e.g. [CLS] a [SEP] b [SEP]."""
        enc = self._tok.encode(text, pair, add_special_tokens=True)
        return enc.ids, enc.type_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def chat_template(self) -> tuple[str, str]:
        """(template, where it came from): chat_template.jinja or tokenizer_config.json's
        chat_template (the "default" one of a named list)."""
        directory = self.path.parent
        source = getattr(self, "template_source", None)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8"), source or str(jinja_file)
        source = source or str(directory / "tokenizer_config.json")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not template:
            raise ConversionError(f"{source}: the tokenizer has no chat_template; pass the "
                                  f"prompt as plain text (without chat=True)")
        return template, source

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat prompt text of `messages`, rendered in a sandbox (the template is untrusted)."""
        template, source = self.chat_template()
        tokens = {f"{role}_token": self._tok.id_to_token(i) for role, i in self._special.items()}
        return render_chat_template(template, source, messages, add_generation_prompt, **tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> SpecialIds:  # type: ignore[override]
        return self._special


class SentencePieceModelTokenizer(Tokenizer):
    """A sentencepiece model file of an imported model (ids as the model has them)."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.model_file = str(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError) as err:
            raise ConversionError(f"{model_file}: not a readable sentencepiece model "
                                  f"({' '.join(str(err).split())[:200]})") from None
        ids = SpecialIds()
        for role, value in (("pad", self._sp.pad_id()), ("unk", self._sp.unk_id()),
                            ("bos", self._sp.bos_id()), ("eos", self._sp.eos_id())):
            if value >= 0:
                ids[role] = int(value)
        self._special = ids

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_ids(self) -> SpecialIds:  # type: ignore[override]
        return self._special


def load_any_tokenizer(directory: str | os.PathLike) -> Optional[Tokenizer]:
    """The tokenizer in `directory`: tokenizer.json, a sentencepiece model, or llmjax's own;
    None when there is none."""
    directory = Path(paths.local_copy(directory, "tokenizer"))
    if (directory / "tokenizer.json").exists():
        return HFTokenizer(directory)
    for name in ("spiece.model", "tokenizer.model"):
        if (directory / name).exists():
            return SentencePieceModelTokenizer(directory / name)
    if (directory / "llmjax_tokenizer.json").exists():
        return load_tokenizer(directory)
    if (directory / "vocab.txt").exists():  # a WordPiece vocabulary only (old BERT dirs)
        from tokenizers import BertWordPieceTokenizer  # optional dependency ('.[hf]')

        tok = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=True)
        tmp = Path(tempfile.mkdtemp(prefix="llmjax-wordpiece-")) / "tokenizer.json"
        tok.save(str(tmp))
        return HFTokenizer(tmp)
    return None
