"""Autoregressive decoding with the KV cache: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded; padding gets segment id 0, so
the cache never shows it to a query, and positions count real tokens only.
The prompt is written to the cache in one call (prefill), then one token per
jitted step. Encoder-decoder models encode once and decode from
`decoder_start_id`. Compiled functions are cached per (config, sampling).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.models.transformer import Transformer

Params = dict
_COMPILED: dict[tuple, Any] = {}


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Next token ids [b] from logits [b, vocab]: argmax when temperature == 0."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
        kept = jnp.where(before < top_p, ordered, jnp.inf)  # the best always stays
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _decode_config(cfg: ModelConfig, needed: int) -> ModelConfig:
    """The config to decode with: the cache sized to what this call needs when positions allow."""
    if cfg.position == "learned":
        if needed > cfg.max_len:
            raise ValueError(f"prompt + max_new_tokens = {needed} exceeds model.max_len="
                             f"{cfg.max_len} (learned positions)")
        return dataclasses.replace(cfg, dropout=0.0)
    size = -(-needed // 16) * 16
    return dataclasses.replace(cfg, max_len=size, dropout=0.0)


def _zeros_cache(model: Transformer, *args, method=None) -> Any:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, method=method))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def _functions(cfg: ModelConfig, temperature: float, top_k: int, top_p: float):
    key = (repr(cfg), float(temperature), int(top_k), float(top_p))
    if key in _COMPILED:
        return _COMPILED[key]
    model = Transformer(cfg, decode=True)
    pick = lambda logits, rng: sample_logits(logits, rng, temperature, top_k, top_p)  # noqa: E731

    @jax.jit
    def prefill(params, cache, tokens, segments, positions, rng):
        out, vars_ = model.apply({"params": params, "cache": cache}, tokens,
                                 segment_ids=segments, positions=positions, mutable=["cache"])
        return pick(out["logits"][:, -1], rng), vars_["cache"]

    @jax.jit
    def step(params, cache, token, positions, rng):
        ones = jnp.ones_like(token)
        out, vars_ = model.apply({"params": params, "cache": cache}, token, segment_ids=ones,
                                 positions=positions, mutable=["cache"])
        return pick(out["logits"][:, -1], rng), vars_["cache"]

    @jax.jit
    def encode(params, tokens, segments):
        return Transformer(cfg).apply({"params": params}, tokens, segments,
                                      method=Transformer.encode)

    @jax.jit
    def decoder_step(params, cache, token, positions, encoded, enc_segments, enc_positions, rng):
        out, vars_ = model.apply({"params": params, "cache": cache}, token, encoded, enc_segments,
                                 enc_positions, jnp.ones_like(token), positions,
                                 method=Transformer.decode_step, mutable=["cache"])
        return pick(out["logits"][:, -1], rng), vars_["cache"]

    _COMPILED[key] = (model, prefill, step, encode, decoder_step)
    return _COMPILED[key]


def _as_rows(prompts: Any) -> list[list[int]]:
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        arr = np.asarray(prompts)
        return [list(map(int, row)) for row in (arr[None] if arr.ndim == 1 else arr)]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], (int, np.integer)):
        return [list(map(int, prompts))]
    return [list(map(int, p)) for p in prompts]


def generate(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]] | np.ndarray,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: Optional[int | Sequence[int]] = None,
             pad_id: int = 0, seed: int = 0, decoder_start_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt (stopping at, and leaving out, an eos id).

    Decoder-only: `prompts` are the context. Encoder-decoder: `prompts` are the
    encoder inputs, and decoding starts from `decoder_start_id` (T5: pad = 0).
    """
    rows = _as_rows(prompts)
    if not rows or (cfg.architecture == "decoder" and any(len(r) == 0 for r in rows)):
        raise ValueError("every prompt needs at least one token")
    if cfg.architecture == "encoder":
        raise ValueError("an encoder-only model does not generate text")
    eos = set() if eos_id is None else ({int(eos_id)} if np.isscalar(eos_id)
                                        else {int(e) for e in eos_id})
    b, longest = len(rows), max(len(r) for r in rows)
    tokens = np.full((b, longest), pad_id, np.int32)
    segments = np.zeros((b, longest), np.int32)
    encoder = cfg.architecture == "encoder_decoder"
    for i, row in enumerate(rows):
        if encoder:  # right-padded encoder inputs
            tokens[i, :len(row)], segments[i, :len(row)] = row, 1
        else:  # left-padded prompts: the next token of every row goes at the same index
            tokens[i, longest - len(row):], segments[i, longest - len(row):] = row, 1
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    needed = (max_new_tokens + 1) if encoder else longest + max_new_tokens
    dcfg = _decode_config(cfg, needed)
    model, prefill, step, encode, decoder_step = _functions(dcfg, temperature, top_k, top_p)
    rng = jax.random.key(seed)

    if encoder:
        encoded, enc_segments, enc_positions = encode(params, tokens, segments)
        token = np.full((b, 1), decoder_start_id, np.int32)
        cache = _zeros_cache(model, token, encoded, enc_segments, enc_positions,
                             method=Transformer.decode_step)
        position = np.zeros((b, 1), np.int32)
        next_fn = lambda cache, tok, pos, key: decoder_step(  # noqa: E731
            params, cache, tok, pos, encoded, enc_segments, enc_positions, key)
        rng, key = jax.random.split(rng)
        nxt, cache = next_fn(cache, token, position, key)
        position = position + 1
    else:
        cache = _zeros_cache(model, tokens[:, :1])
        rng, key = jax.random.split(rng)
        nxt, cache = prefill(params, cache, tokens, segments, positions, key)
        position = positions[:, -1:] + 1
        next_fn = lambda cache, tok, pos, key: step(params, cache, tok, pos, key)  # noqa: E731

    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    for t in range(max_new_tokens):
        ids = np.asarray(nxt)
        for i in range(b):
            if not done[i]:
                if int(ids[i]) in eos:
                    done[i] = True
                else:
                    out[i].append(int(ids[i]))
        if done.all() or t == max_new_tokens - 1:
            break
        rng, key = jax.random.split(rng)
        nxt, cache = next_fn(cache, ids[:, None].astype(np.int32), position, key)
        position = position + 1
    return out
