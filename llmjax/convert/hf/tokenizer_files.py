"""The tokenizer files written beside an HF export, and the special ids config.json takes
from them."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "spiece.model", "tokenizer.model", "merges.txt", "vocab.json",
                   "generation_config.json", "added_tokens.json", "chat_template.jinja")
# An llmjax-trained sentencepiece tokenizer (llmjax/data/tokenizer.py) in an llmjax export.
LLMJAX_TOKENIZER_FILES = ("llmjax_tokenizer.json", "spm.model")


def special_token_ids(tokenizer: Any, directory: Path) -> dict[str, int]:
    """bos/eos/pad ids for config.json: from the tokenizer object, else the written files."""
    special: Any = getattr(tokenizer, "special_ids", None)
    if special is None and (directory / "tokenizer.json").exists():
        from llmjax.data.tokenizer import HFTokenizer

        special = HFTokenizer(directory).special_ids
    if special is None:
        return {}
    special = dict(special)
    return {f"{role}_token_id": int(special[role]) for role in ("bos", "eos", "pad")
            if role in special}


def _write_generation_config(out: Path, hf: dict) -> None:
    path = out / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if key in hf:
            config[key] = hf[key]
    if config:
        path.write_text(json.dumps(config, indent=2) + "\n")


def _tokenizer_source(tokenizer: Any) -> tuple[Any, Optional[Path]]:
    """(the innermost tokenizer, the directory holding its files)."""
    inner = getattr(tokenizer, "inner", tokenizer)  # llmjax.data's wrapper of imported ones
    path = getattr(inner, "path", None) or getattr(inner, "model_file", None)
    return inner, (Path(path).parent if path is not None else None)


def write_hf_tokenizer(tokenizer: Any, out: str | os.PathLike) -> list[str]:
    """The tokenizer files AutoTokenizer.from_pretrained(out) loads: an imported tokenizer's
    own files, or a tokenizer.json built from an llmjax-trained sentencepiece model."""
    from llmjax.data.tokenizer import METADATA_FILE

    inner, directory = _tokenizer_source(tokenizer)
    if directory is None:
        return []
    if (directory / METADATA_FILE).exists() and not (directory / "tokenizer.json").exists():
        from llmjax.convert.sp_export import write_sentencepiece_as_hf

        return write_sentencepiece_as_hf(inner, directory / METADATA_FILE, Path(out))
    return copy_tokenizer_files(directory, out)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike,
                         names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy the tokenizer files present in `src` to `dst` (new files get the umask's
    permissions, not the source's); returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in names:
        if (src / name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
