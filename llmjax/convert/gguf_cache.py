"""A GGUF file converted once, reused after: `from_pretrained(x.gguf)` dequantises it into
$LLMJAX_CACHE/gguf/<key>/ (default ~/.cache/llmjax/gguf: model.json, the fp32
parameters as one flat params.safetensors, tokenizer/) and later calls memory-map
that instead of dequantising again (safetensors loads ~5x faster than an orbax export).

The key hashes the file's size, mtime and the bytes at its start (the GGUF header:
metadata and tensor table) and end, plus CACHE_FORMAT, so an edited or replaced
file gets a new entry. An entry is built in a temporary directory and renamed
into place with a COMPLETE marker written last: an interrupted build leaves no
entry, and one without its marker, or whose marker does not match the file, is
rebuilt, never loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from llmjax import paths
from llmjax.config import ConfigError
from llmjax.errors import ConversionError

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when the conversion's output changes
HASHED_BYTES = 8 << 20  # from each end of the file; a GGUF header holds the vocabulary
MARKER = "COMPLETE.json"  # written last
PARAMS = "params.safetensors"


def cache_root() -> Path:
    """$LLMJAX_CACHE/gguf, or ~/.cache/llmjax/gguf."""
    base = os.environ.get("LLMJAX_CACHE") or "~/.cache/llmjax"
    return Path(base).expanduser() / "gguf"


def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies the file's content for the cache (cheap: no full read)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(HASHED_BYTES))
        if stat.st_size > 2 * HASHED_BYTES:
            f.seek(-HASHED_BYTES, os.SEEK_END)
            digest.update(f.read(HASHED_BYTES))
    return {"format": CACHE_FORMAT, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256_ends": digest.hexdigest()}


def _key(print_: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:24]


def _valid(entry: Path, print_: dict[str, Any]) -> bool:
    try:
        marker = json.loads((entry / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("fingerprint") == print_ and all(
        (entry / name).is_file() for name in ("model.json", PARAMS, "tokenizer/tokenizer.json"))


def cached_entry(path: str | os.PathLike) -> Path:
    """The cache entry of GGUF file `path`, converting the file on a miss."""
    from llmjax.convert.gguf import import_gguf, write_gguf_tokenizer
    from llmjax.convert.safetensors_io import _umask, write_safetensors
    from llmjax.tree import flatten

    path = Path(path).resolve()
    print_ = fingerprint(path)
    root = cache_root()
    entry = root / _key(print_)
    if _valid(entry, print_):
        return entry
    if entry.exists():  # incomplete or not matching: never used
        log.info("rebuilding incomplete GGUF cache entry %s", entry)
        shutil.rmtree(entry, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
    try:
        cfg, params = import_gguf(path, scan_layers=True)
        write_safetensors(build / PARAMS, {k: np.asarray(v) for k, v in flatten(params).items()})
        (build / "model.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n",
                                          encoding="utf-8")
        write_gguf_tokenizer(path, build / "tokenizer")
        (build / MARKER).write_text(json.dumps({"fingerprint": print_, "source": str(path)},
                                               indent=2) + "\n", encoding="utf-8")
        os.chmod(build, 0o777 & ~_umask())  # mkdtemp makes it 0700
        try:
            os.replace(build, entry)
        except OSError:  # another process finished the same entry first
            if not _valid(entry, print_):
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    _prune(root, path, keep=entry)
    return entry


def load_entry(entry: Path, scan_layers: bool = True, **overrides: Any):
    """The PretrainedModel of a cache entry (parameters memory-mapped, then on device)."""
    import jax

    from llmjax.config import ModelConfig, section_from_dict
    from llmjax.convert.safetensors_io import read_safetensors
    from llmjax.data.tokenizer import HFTokenizer
    from llmjax.pretrained import PretrainedModel
    from llmjax.tree import unflatten, unstack_layers

    data = json.loads((entry / "model.json").read_text(encoding="utf-8"))
    data.update(overrides)
    cfg = section_from_dict(ModelConfig, data, "model")
    cfg.validate()
    params = jax.tree.map(jax.numpy.asarray, unflatten(read_safetensors(entry / PARAMS)))
    if not scan_layers:
        params = unstack_layers(params)
    cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
    return PretrainedModel(cfg, params, HFTokenizer(entry / "tokenizer"))


def _prune(root: Path, source: Path, keep: Path) -> None:
    """Drop older entries of the same source file (it changed): they can never match again."""
    for other in root.iterdir():
        if other == keep or not other.is_dir():
            continue
        try:
            marker = json.loads((other / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict) and marker.get("source") == str(source):
            shutil.rmtree(other, ignore_errors=True)


def load_gguf(path: str | os.PathLike, scan_layers: bool = True, cache: bool = True,
              **overrides: Any):
    """from_pretrained for a .gguf file: through the cache (unless `cache` is False, or the
    cache directory cannot be written). A gs:// file is fetched once into the cache first."""
    path = Path(paths.local_copy(path, "GGUF file"))
    if not cache:
        return _load_uncached(path, scan_layers, **overrides)
    try:
        entry = cached_entry(path)
    except OSError as err:  # read-only or full disk: still load, just not cached
        log.warning("GGUF cache %s not usable (%s); converting without caching",
                    cache_root(), err)
        return _load_uncached(path, scan_layers, **overrides)
    try:
        model = load_entry(entry, scan_layers, **overrides)
    except (ConversionError, OSError, ValueError, KeyError) as err:
        if isinstance(err, ConfigError) and not isinstance(err, ConversionError):
            raise  # a bad override, not a bad entry
        log.warning("GGUF cache entry %s is damaged (%s); rebuilding it", entry, err)
        shutil.rmtree(entry, ignore_errors=True)
        model = load_entry(cached_entry(path), scan_layers, **overrides)
    model.source = str(path)
    if model.tokenizer is not None:  # chat template errors name the file it came from
        model.tokenizer.template_source = f"{path} (GGUF metadata tokenizer.chat_template)"
    return model


def _load_uncached(path: Path, scan_layers: bool, **overrides: Any):
    from llmjax.convert.gguf import import_gguf, write_gguf_tokenizer
    from llmjax.data.tokenizer import HFTokenizer
    from llmjax.pretrained import PretrainedModel

    cfg, params = import_gguf(path, scan_layers=scan_layers, **overrides)
    tokenizer = HFTokenizer(write_gguf_tokenizer(path, tempfile.mkdtemp(prefix="llmjax-gguf-")))
    tokenizer.template_source = f"{path} (GGUF metadata tokenizer.chat_template)"
    return PretrainedModel(cfg, params, tokenizer, str(path))
