"""objective.reference=cached: dpo's reference scores computed once and read with the data.

Before step 0 the summed completion log-probs of every pair's chosen and rejected side under
the initial parameters (the reference of objective.reference=copy) are computed over the
whole split and stored in `train.run_dir/reference_logprobs/{split}.npz`. The data pipeline
then adds them to every batch as float fields `ref_chosen`, `ref_rejected` [B]
(BatchIterator.attach: row r gets its own pair's scores), so the train step runs no
reference forward pass and holds no reference weights. The iterator's state is unchanged,
so a resumed run reads the same batches with the same scores.

The file holds two keys, and a file whose keys do not fit is never used:
- `data`: a SHA-256 of the split's pairs exactly as the pipeline builds them (token ids and
  masks after tokenization, chat template, eos and truncation to train.seq_len), in source
  order; so any change of the files, tokenizer or row length shows;
- `params`: an exact fingerprint of the initial (merged) parameters: per leaf, wrap-around
  uint32 sums of its bits times hashes of the element positions, which do not depend on
  the order of the additions, so the mesh does not change it.
A fresh run recomputes a file whose keys differ (a warning names it and what changed) and
replaces it. A resumed run no longer has its initial parameters (the state has trained), so
its file must be there and fit the data; otherwise CheckpointError names the file.

The file is written atomically: locally under a temporary name, then renamed; on object
storage (etils.epath) one object upload, which appears whole. Multi-host: the run directory
is shared (checkpoints need that too). Every process hashes the data and reads the file; one
decision for all (valid on every process, or recompute); the scores are computed on the
whole mesh (each process feeds its rows of each batch, as in training) and come back
replicated, so every process holds all of them; process 0 writes the file.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import parallel, paths
from llmjax.checkpoint import CheckpointError
from llmjax.data.device import to_global
from llmjax.data.preference import KEYS
from llmjax.objectives.preference import CACHED
from llmjax.train.step import forward

log = logging.getLogger(__name__)

CACHE_DIR = "reference_logprobs"  # under train.run_dir
VERSION = 1


def is_cached(exp) -> bool:
    return bool(getattr(exp.objective, "cached_reference", False))


def cache_path(run_dir, split: str):
    """The cache file of `split` (an etils.epath.Path: local or object storage)."""
    return paths.resolve(paths.join(os.fspath(run_dir), CACHE_DIR, f"{split}.npz"),
                         "train.run_dir")


def splits(config) -> list[str]:
    """The splits a run reads: train, and validation when the data has one."""
    data = config.data
    has_validation = bool(data.validation_files) or data.validation_fraction > 0
    return ["train"] + (["validation"] if has_validation and config.train.eval_steps else [])


def prepare(exp, state, run_dir, resumed: bool, progress: bool = True) -> None:
    """Fill exp.reference_logprobs[split] for every split the run reads: from the cache
    file when it fits, else (fresh runs only) computed from `state`'s parameters and
    written. A resumed run whose file is missing or stale is a CheckpointError."""
    if not is_cached(exp):
        return
    from llmjax.train.evaluate import data_iterator  # (evaluate attaches what this fills)

    # a bar on a terminal (as the trainer's); log lines otherwise
    show = progress and jax.process_index() == 0 and sys.stderr.isatty()
    params_key: Optional[str] = None
    scores = score_fn(exp)  # one compile for every split (same batch shape)
    for split in splits(exp.config):
        it = data_iterator(exp, split, reference=False)
        try:
            path = cache_path(run_dir, split)
            data_key = data_fingerprint(it, split, show)
            saved = read(path)
            if resumed:
                ok = saved is not None and saved["data"] == data_key
                if not _everywhere(ok):
                    raise CheckpointError(
                        f"{path}: " + ("missing" if saved is None else "computed for other "
                                       "data (the pairs, tokenizer or train.seq_len changed)") +
                        "; a resumed run cannot recompute the reference log-probs (its initial "
                        "parameters are gone): restore the file and the run's data, or start "
                        "a new run (another train.run_dir)")
                values = saved
                log.info("reference log-probs of %d %s pairs read from %s", it.num_documents,
                         split, path)
            else:
                if params_key is None:
                    params_key = params_fingerprint(exp, state)
                ok = saved is not None and (saved["data"], saved["params"]) == (data_key,
                                                                                params_key)
                if _everywhere(ok):
                    values = saved
                    log.info("reference log-probs of %d %s pairs read from %s",
                             it.num_documents, split, path)
                else:
                    if saved is not None and jax.process_index() == 0:
                        changed = [what for what, a, b in (("data", saved["data"], data_key),
                                   ("initial parameters", saved["params"], params_key)) if a != b]
                        log.warning("%s was computed for other %s: recomputing it", path,
                                    " and ".join(changed) or "settings")
                    if jax.process_index() == 0:
                        log.info("computing the reference log-probs of %d %s pairs (one "
                                 "forward pass over them) ...", it.num_documents, split)
                    chosen, rejected = compute(exp, state, it, split, show, scores)
                    values = {"chosen": chosen, "rejected": rejected}
                    if jax.process_index() == 0:
                        write(path, chosen, rejected, data_key, params_key)
                        log.info("reference log-probs of %d %s pairs written to %s",
                                 it.num_documents, split, path)
        finally:
            it.close()
        exp.reference_logprobs[split] = {CACHED[0]: values["chosen"],
                                         CACHED[1]: values["rejected"]}


def values_for(exp, split: str) -> dict[str, np.ndarray]:
    """The scores of `split` for BatchIterator.attach: computed by `prepare` in this process,
    or read from the run directory's file (`llmjax eval` of a finished run: the data must
    fit, as on resume)."""
    if split not in exp.reference_logprobs:
        from llmjax.train.evaluate import data_iterator
        it = data_iterator(exp, split, reference=False)
        try:
            path = cache_path(exp.config.train.run_dir, split)
            saved = read(path)
            if saved is None or saved["data"] != data_fingerprint(it, split, False):
                raise CheckpointError(f"{path}: {'missing' if saved is None else 'stale'}; "
                                      f"objective.reference=cached reads the reference "
                                      f"log-probs its training run computed for this data")
        finally:
            it.close()
        exp.reference_logprobs[split] = {CACHED[0]: saved["chosen"], CACHED[1]: saved["rejected"]}
    return exp.reference_logprobs[split]


# ---------------------------------------------------------------- keys


def data_fingerprint(it, split: str, show: bool) -> str:
    """SHA-256 of the split's pairs as the pipeline builds them, in source order."""
    from tqdm import tqdm

    digest = hashlib.sha256(f"preference {it.num_documents} {it.seq_len}".encode())
    for index in tqdm(range(it.num_documents), desc=f"hashing {split} pairs", unit="pair",
                      disable=not show, leave=False):
        for piece in it.document_pieces(index):
            for key in KEYS:
                array = np.ascontiguousarray(piece[key], np.int32)
                digest.update(np.int64(array.size).tobytes())
                digest.update(array.tobytes())
    return digest.hexdigest()


def _mix32(v):
    """A 32-bit integer hash (lowbias32): well-mixed, wraps mod 2^32."""
    v = v ^ (v >> 16)
    v = v * jnp.uint32(0x7FEB352D)
    v = v ^ (v >> 15)
    v = v * jnp.uint32(0x846CA68B)
    return v ^ (v >> 16)


def _leaf_sums(x) -> jax.Array:
    """Two uint32 sums over the bits of `x` weighted by hashes of each element's position:
    exact (integer addition mod 2^32 is associative), so any sharding gives the same."""
    width = x.dtype.itemsize
    if width > 4:  # 64-bit floats: the two 32-bit halves
        x = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif width < 4 or x.dtype != jnp.uint32:
        x = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width])
    bits = x.astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride)
        stride = (stride * bits.shape[dim]) & 0xFFFFFFFF
    first = jnp.sum(bits * (_mix32(index) | jnp.uint32(1)), dtype=jnp.uint32)
    second = jnp.sum(_mix32(bits ^ _mix32(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([first, second])


def params_fingerprint(exp, state) -> str:
    """An exact fingerprint of the parameters the reference is (the state's merged params)."""
    import flax.linen as nn
    from llmjax.tree import flatten_parts

    def sums(trainable, frozen):
        return jax.tree.map(_leaf_sums, exp.plan.merge(trainable, frozen))

    replicated = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        out = jax.jit(sums, out_shardings=replicated)(state.params, state.frozen)
    digest = hashlib.sha256()
    for path, value in sorted(flatten_parts(jax.device_get(out)).items()):
        digest.update(f"{'/'.join(path)}:{np.asarray(value).tolist()};".encode())
    shapes = jax.eval_shape(exp.plan.merge, state.params, state.frozen)
    for path, leaf in sorted(flatten_parts(shapes).items()):
        digest.update(f"{'/'.join(path)}:{leaf.shape}:{leaf.dtype};".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- computing


def score_fn(exp):
    """jit (trainable, frozen, batch) -> (chosen, rejected) scores [B], replicated: the merged
    parameters' summed completion log-probs, no dropout."""
    objective, plan, model = exp.objective, exp.plan, exp.model

    def scores(trainable, frozen, batch):
        batch = objective.prepare(batch, jax.random.key(0))  # (preference: no randomness)
        outputs = forward(model, plan.merge(trainable, frozen), batch,
                          exp.config.train.logits_chunk, deterministic=True)
        return objective.reference_scores(outputs, batch)

    replicated = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
    return jax.jit(scores, out_shardings=(replicated, replicated))


def compute(exp, state, it, split: str, show: bool, fn=None) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) reference scores of every pair of the split, float32 [N]: the
    state's merged parameters, no dropout, batches of train.batch_size pairs on the mesh."""
    import flax.linen as nn
    from tqdm import tqdm

    cfg = exp.config
    fn = fn or score_fn(exp)
    sharding = parallel.batch_sharding(exp.mesh)
    size, n = cfg.train.batch_size, it.num_documents
    local = size // jax.process_count()
    first = jax.process_index() * local
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    with tqdm(total=n, desc=f"reference log-probs ({split})", unit="pair",
              disable=not show) as bar, jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        for start in range(0, n, size):
            rows = [start + first + r for r in range(local)]
            batch = to_global(it.batch_of(rows), sharding)
            c, r = jax.device_get(fn(state.params, state.frozen, batch))
            end = min(start + size, n)
            chosen[start:end], rejected[start:end] = c[:end - start], r[:end - start]
            bar.update(end - start)
    return chosen, rejected


# ---------------------------------------------------------------- the file


def read(path) -> Optional[dict]:
    """The cache file's arrays and keys, or None when it is missing or unreadable (warned)."""
    try:
        if not path.exists():
            return None
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
            if int(f["version"]) != VERSION:
                return None
            return {"chosen": f["chosen"].astype(np.float32),
                    "rejected": f["rejected"].astype(np.float32),
                    "data": str(f["data"]), "params": str(f["params"])}
    except (OSError, ValueError, KeyError) as err:
        log.warning("%s is unreadable (%s): ignored", path, err)
        return None


def write(path, chosen, rejected, data_key: str, params_key: str) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, chosen=chosen, rejected=rejected, data=np.array(data_key),
             params=np.array(params_key), version=np.array(VERSION))
    if paths.is_remote(os.fspath(path)):  # one object upload appears whole
        path.write_bytes(buffer.getvalue())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    partial.write_bytes(buffer.getvalue())
    partial.replace(path)  # atomic: a reader sees the old file or the new one


def _everywhere(ok: bool) -> bool:
    from llmjax.train.resume import _everywhere as everywhere
    return everywhere(ok)
