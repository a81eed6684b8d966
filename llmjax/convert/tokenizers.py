"""Tokenizers of imported models behind llmjax's tokenizer interface.

`HFTokenizer` wraps an HF `tokenizer.json` (the `tokenizers` library);
`SentencePieceModelTokenizer` wraps a plain sentencepiece model (T5's
spiece.model, LLaMA's tokenizer.model). Both give encode(text) -> ids (no
special tokens), decode(ids) -> text, vocab_size and special_ids, a mapping
from role (pad, unk, bos, eos, mask, cls, sep) to the model's own ids:
imported vocabularies keep their ids, they are not renumbered.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional

from llmjax.convert.chat_template import render_chat_template
from llmjax.errors import ConversionError
from llmjax.data.tokenizer import Tokenizer

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


def _json_object(path: Path) -> dict:
    """A JSON object file (tokenizer_config.json, special_tokens_map.json) or ConversionError."""
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
            data = _json_object(path)
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
        self.config = _json_object(config) if config.exists() else {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; with add_special_tokens, the model's template ([CLS] .. [SEP])."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

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
    directory = Path(directory)
    if (directory / "tokenizer.json").exists():
        return HFTokenizer(directory)
    for name in ("spiece.model", "tokenizer.model"):
        if (directory / name).exists():
            return SentencePieceModelTokenizer(directory / name)
    if (directory / "llmjax_tokenizer.json").exists():
        from llmjax.data.tokenizer import load_tokenizer

        return load_tokenizer(directory)
    if (directory / "vocab.txt").exists():  # a WordPiece vocabulary only (old BERT dirs)
        from tokenizers import BertWordPieceTokenizer

        import tempfile

        tok = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=True)
        tmp = Path(tempfile.mkdtemp(prefix="llmjax-wordpiece-")) / "tokenizer.json"
        tok.save(str(tmp))
        return HFTokenizer(tmp)
    return None
