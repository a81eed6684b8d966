"""Torch-free safetensors reading (memory-mapped numpy views) and writing.

Reading parses the format directly (8-byte header length, JSON header, raw
little-endian data), so bfloat16 checkpoints load through ml_dtypes and no
pickle is ever involved.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from llmjax import paths
from llmjax.errors import ConversionError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as read-only numpy views (memory-mapped).

    The header is untrusted: its size, every dtype, shape and byte range are checked
    against the file before any view is made, so a crafted header fails as one
    ConversionError instead of a crash, a wrapped slice or a huge allocation."""
    path = Path(paths.local_copy(path, "safetensors file"))  # memory-mapped: a local file
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > min(MAX_HEADER_BYTES, file_size - 8):
            raise ConversionError(f"{path}: not a safetensors file (header of {size} bytes in a "
                                  f"file of {file_size})")
        try:
            header = json.loads(f.read(size))
        except (ValueError, RecursionError) as err:
            raise ConversionError(f"{path}: not a safetensors file (header: "
                                  f"{str(err)[:200]})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (the header is not a JSON object)")
    data_size = file_size - 8 - size
    specs = {name: _tensor_spec(path, name, info, data_size)
             for name, info in header.items() if name != "__metadata__"}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size) if data_size else \
        np.zeros(0, np.uint8)
    return {name: data[start:end].view(dtype).reshape(shape)
            for name, (dtype, shape, start, end) in specs.items()}


def _tensor_spec(path: Path, name: str, info, data_size: int) -> tuple:
    """(numpy dtype, shape, start, end) of one header entry, validated."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ConversionError(f"{where}: header entry is not an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConversionError(f"{where} has unsupported dtype {dtype!r}; supported: "
                              f"{sorted(DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ConversionError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1] <= data_size):
        raise ConversionError(f"{where}: data_offsets {offsets!r} are not a byte range within "
                              f"the file's {data_size} data bytes")
    start, end = offsets
    expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize  # Python ints: no overflow
    if end - start != expected:
        raise ConversionError(f"{where}: shape {shape} of {dtype} needs {expected} bytes, the "
                              f"header gives {end - start}")
    return DTYPES[dtype], tuple(shape), start, end


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_hf_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of an HF model directory: model.safetensors or a sharded index (a gs:// one
    is fetched once into the cache)."""
    directory = Path(paths.local_copy(directory, "model directory"))
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConversionError(f"{index}: not a safetensors index ({type(err).__name__}: "
                                  f"{str(err)[:200]}); it needs a \"weight_map\" object") from None
        for name in files:  # shards live beside the index, never elsewhere
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(
                    ".safetensors"):
                raise ConversionError(f"{index}: shard {name!r} is not a .safetensors file name "
                                      f"in {directory}")
        tensors: dict[str, np.ndarray] = {}
        for name in files:
            tensors.update(read_safetensors(directory / name))
        return tensors
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = (f" (found {pickled}: pickle checkpoints are never loaded; re-save with "
            f"`save_pretrained(..., safe_serialization=True)`)" if pickled else "")
    raise ConversionError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Write fp32/any numpy tensors with the metadata transformers expects."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())  # save_file creates 0600 files; others' files are 0644


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (as transformers reads them)."""
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if text.endswith(u)), "")
        try:
            value = int(float(text[: len(text) - len(unit)]) * _SIZE_UNITS.get(unit, 1))
        except ValueError:
            raise ConversionError(f"shard size {size!r}: expected bytes or e.g. '5GB', '500MB'") \
                from None
    if value <= 0:
        raise ConversionError(f"shard size {size!r} must be positive")
    return value


def write_hf_tensors(directory: str | os.PathLike, tensors: dict[str, np.ndarray],
                     max_shard_bytes: int) -> list[str]:
    """Write model.safetensors, or model-0000i-of-0000N.safetensors shards of at most
    `max_shard_bytes` (a bigger single tensor gets a shard of its own) plus
    model.safetensors.index.json, as transformers' save_pretrained does. Weight files of an
    earlier export in `directory` are removed first, so the directory never mixes two.
    Returns the file names written."""
    directory = Path(directory)
    for old in [directory / "model.safetensors", directory / "model.safetensors.index.json",
                *directory.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    filled = 0
    for name, array in tensors.items():
        if shards[-1] and filled + array.nbytes > max_shard_bytes:
            shards.append({})
            filled = 0
        shards[-1][name] = array
        filled += array.nbytes
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", shards[0])
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        write_safetensors(directory / file, shard)
        weight_map.update({name: file for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]
