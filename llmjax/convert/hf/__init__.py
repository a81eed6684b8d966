"""Hugging Face safetensors directories <-> llmjax parameter trees, torch-free.

One table per family (gpt2.py, bert.py, t5.py, llama.py, registered in family.py) lists,
for every HF tensor, the llmjax path(s) it becomes and the two reshapes between them
(specs.py). The same table drives import and export (tensors.py), so the two directions
cannot drift apart. This module reads and writes the directories.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import ml_dtypes
import numpy as np

from llmjax.config import ConfigError, ModelConfig
# Registers the families, in the order error messages list them.
from llmjax.convert.hf import gpt2, bert, t5, llama, mixtral, olmoe  # noqa: F401,I001
from llmjax.convert.hf.family import (FAMILIES, LLMJAX_FAMILY, Family, family_of_config,
                                      family_of_hf_config, supported_architectures)
from llmjax.convert.hf.specs import Spec
from llmjax.convert.hf.tensors import (expected_shapes, finish, params_to_tensors,
                                       tensors_to_params)
from llmjax.convert.hf.tokenizer_files import (LLMJAX_TOKENIZER_FILES, TOKENIZER_FILES,
                                               _tokenizer_source, _write_generation_config,
                                               copy_tokenizer_files, special_token_ids,
                                               write_hf_tokenizer)
from llmjax.convert.safetensors_io import parse_size, read_hf_tensors, write_hf_tensors
from llmjax.data.tokenizer import read_json_object
from llmjax.errors import ConversionError

Params = dict

__all__ = [  # the public names of llmjax.convert.hf (gguf, peft_export, pretrained use them)
    "EXPORT_DTYPES", "FAMILIES", "LLMJAX_FAMILY", "LLMJAX_TOKENIZER_FILES", "TOKENIZER_FILES",
    "Family", "Spec", "copy_tokenizer_files", "expected_shapes", "export_hf",
    "family_of_config", "family_of_hf_config", "finish", "import_hf", "params_to_tensors",
    "read_hf_config", "special_token_ids", "supported_architectures", "tensors_to_params",
    "write_hf_tokenizer", "_tokenizer_source"]


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model directory)")
    return read_json_object(path)


def import_hf(directory: str | os.PathLike, scan_layers: bool = True,
              **overrides: Any) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) of an HF safetensors model directory; torch is not needed.

    `overrides` set ModelConfig fields that HF configs do not carry (dtype, max_len, ...).
    """
    hf = read_hf_config(directory)
    family = family_of_hf_config(hf)
    tensors = read_hf_tensors(directory)
    try:
        cfg = family.to_config(hf, tensors)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as err:
        if isinstance(err, ConfigError):
            raise
        # config.json is untrusted: a wrong type or zero in a field is the file's fault
        raise ConversionError(f"{directory}/config.json: a field has an unusable value "
                              f"({type(err).__name__}: {err})") from None
    params = tensors_to_params(family, cfg, tensors, source=str(directory))
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return finish(cfg, params, scan_layers)


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def export_hf(cfg: ModelConfig, params: Params, out: str | os.PathLike,
              tokenizer_dir: Optional[str | os.PathLike] = None, dtype: str = "float32",
              max_shard_size: int | str = "5GB", tokenizer: Any = None) -> Path:
    """Write config.json + safetensors weights that `transformers` loads: model.safetensors,
    or shards of at most `max_shard_size` with an index (as save_pretrained writes them),
    in `dtype` (float32, bfloat16 or float16). The tokenizer (`tokenizer`, an llmjax or
    imported tokenizer object, or the files in `tokenizer_dir`) is written so
    AutoTokenizer loads it, and its bos/eos/pad ids go into config.json and
    generation_config.json."""
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"export dtype {dtype!r}: choose one of {sorted(EXPORT_DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    family, tensors = params_to_tensors(cfg, params, EXPORT_DTYPES[dtype])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = family.hf_config(cfg)
    hf["dtype"] = hf["torch_dtype"] = dtype  # the key transformers reads, and its older name
    write_hf_tensors(out, tensors, max_bytes)
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, out)
    elif tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    ids = special_token_ids(tokenizer, out)
    hf.update(ids)
    if cfg.architecture == "encoder_decoder" and "pad_token_id" in ids:
        hf["decoder_start_token_id"] = ids["pad_token_id"]  # T5 decodes from pad
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    _write_generation_config(out, hf)
    return out
