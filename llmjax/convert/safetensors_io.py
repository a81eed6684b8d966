"""Torch-free safetensors reading (memory-mapped numpy views) and writing.

Reading parses the format directly (8-byte header length, JSON header, raw
little-endian data), so bfloat16 checkpoints load through ml_dtypes and no
pickle is ever involved.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from llmjax.convert.errors import ConversionError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as read-only numpy views (memory-mapped)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ConversionError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except ValueError as err:
            raise ConversionError(f"{path}: not a safetensors file ({err})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        tensors[name] = data[start:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def read_hf_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of an HF model directory: model.safetensors or a sharded index."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
