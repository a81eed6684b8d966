"""HF-named tensors <-> the llmjax parameter tree of a config, through a family's specs
(flat "a/b/c" paths and layer (un)stacking: llmjax/tree.py)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from llmjax.config import ConfigError, ModelConfig
from llmjax.convert.hf.family import Family, family_of_config
from llmjax.errors import ConversionError
from llmjax.tree import flatten, stack_layers, unflatten, unstack_layers

Params = dict


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Flat path -> shape of the llmjax parameters of `cfg` (unscanned), without allocating."""
    from llmjax.models import abstract_params

    cfg = dataclasses.replace(cfg, scan_layers=False)
    return {k: tuple(v.shape) for k, v in flatten(abstract_params(cfg, boxed=False)).items()}


def tensors_to_params(family: Family, cfg: ModelConfig, tensors: dict[str, np.ndarray],
                      source: str = "checkpoint") -> Params:
    """Map HF-named tensors onto the llmjax tree of `cfg`; errors name the tensor at fault."""
    flat, used, missing = {}, set(), []
    tensors = family.import_tensors(cfg, tensors)
    for spec in family.specs(cfg, family.import_prefix(tensors)):
        name = next((n for n in spec.hf if n in tensors), None)
        if name is None:
            missing.append(spec.hf[0])
            continue
        array = tensors[name]
        if tuple(array.shape) != spec.hf_shape:
            raise ConversionError(f"tensor {name!r} in {source} has shape {tuple(array.shape)}, "
                                  f"but the config implies {spec.hf_shape}")
        used.add(name)
        for path, value in zip(spec.paths, spec.to_llmjax(np.asarray(array, np.float32))):
            flat[path] = np.ascontiguousarray(value)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"missing tensor(s) in {source}: {missing[:5]}{more}")
    unused = [n for n in tensors if n not in used and not family.ignorable(n, cfg)]
    if unused:
        more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
        raise ConversionError(f"unexpected tensor(s) in {source} that the config does not "
                              f"account for: {sorted(unused)[:5]}{more}")
    shapes = expected_shapes(cfg)
    for path, shape in shapes.items():
        if path not in flat:
            raise ConversionError(f"llmjax parameter {path!r} has no source tensor")
        if tuple(flat[path].shape) != shape:
            raise ConversionError(f"llmjax parameter {path!r}: converted shape "
                                  f"{flat[path].shape} != expected {shape}")
    return unflatten(flat)


def finish(cfg: ModelConfig, params: Params, scan_layers: bool) -> tuple[ModelConfig, Params]:
    """Validate, device-put and (optionally) stack layers for nn.scan."""
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConversionError(f"converted config is invalid: {err}") from None
    params = jax.tree.map(lambda x: jax.numpy.asarray(x), params)
    if scan_layers:
        params = stack_layers(params)
    return dataclasses.replace(cfg, scan_layers=scan_layers), params


def params_to_tensors(cfg: ModelConfig, params: Params,
                      dtype: Any = np.float32) -> tuple[Family, dict[str, np.ndarray]]:
    """HF-named tensors (in `dtype`) of an llmjax tree (scanned or not)."""
    family = family_of_config(cfg)
    family.check_export(cfg)
    ucfg = dataclasses.replace(cfg, scan_layers=False)
    flat = flatten(unstack_layers(jax.tree.map(np.asarray, dict(params))))
    shapes = expected_shapes(ucfg)
    for path, shape in shapes.items():
        if path not in flat:
            raise ConversionError(f"llmjax parameter {path!r} is missing from the tree")
        if tuple(flat[path].shape) != shape:
            raise ConversionError(f"llmjax parameter {path!r} has shape {flat[path].shape}, "
                                  f"but the config implies {shape}")
    extra = sorted(set(flat) - set(shapes))
    if extra:
        raise ConversionError(f"llmjax parameter(s) {extra[:5]} have no Hugging Face "
                              f"counterpart (merge PEFT parameters first)")
    tensors = {}
    for spec in family.specs(ucfg, family.export_prefix(ucfg)):
        arrays = tuple(np.asarray(flat[p], np.float32) for p in spec.paths)
        # cast tensor by tensor: a 7B export never holds a second full-precision copy
        tensors[spec.hf[0]] = np.ascontiguousarray(spec.to_hf(arrays)).astype(dtype, copy=False)
    return family, family.export_tensors(ucfg, tensors)
