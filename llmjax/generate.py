"""Autoregressive decoding with the KV cache: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded; padding gets segment id 0, so
the cache never shows it to a query, and positions count real tokens only.
The prompt is written to the cache in one call (prefill), then one token per
jitted step. Encoder-decoder models encode once and decode from
`decoder_start_id`. Compiled functions are cached per (config, sampling).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError, ModelConfig
from llmjax.models.transformer import Transformer
from llmjax.tree import abstract_variables

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
    """The config to decode with: the cache sized to what this call needs when positions allow
    (`check_length` has already held `needed` to model.max_len)."""
    if cfg.position == "learned":
        return dataclasses.replace(cfg, dropout=0.0)
    size = -(-needed // 16) * 16
    return dataclasses.replace(cfg, max_len=size, dropout=0.0)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling(max_new_tokens: Any, temperature: Any = 0.0, top_k: Any = 0,
                   top_p: Any = 1.0, seed: Any = 0) -> None:
    """ConfigError for sampling arguments that would silently misbehave (checked before
    any model is loaded or compiled)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer "
                          f"(the number of tokens to generate)")
    if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise ConfigError(f"temperature={temperature!r}: must be a finite number >= 0 "
                          f"(0 = greedy, 1 = the model's distribution)")
    if not _is_int(top_k) or top_k < 0:
        raise ConfigError(f"top_k={top_k!r}: must be an integer >= 0 (0 = no top-k cut)")
    if (not isinstance(top_p, numbers.Real) or isinstance(top_p, bool)
            or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p={top_p!r}: must be in (0, 1] (1 = no nucleus cut)")
    if not _is_int(seed):
        raise ConfigError(f"seed={seed!r}: must be an integer")


def check_token_ids(ids: Any, vocab_size: int, name: str = "input_ids",
                    size_name: str = "vocab_size") -> np.ndarray:
    """`ids` as an int32 array, or a ConfigError naming the first id outside [0, vocab_size)
    and its position: the embedding lookup would otherwise clamp or wrap it silently."""
    try:
        arr = np.asarray(ids)
    except ValueError:  # ragged nested lists
        arr = np.asarray(None, object)
    if arr.dtype == object:
        raise ConfigError(f"{name}: rows of different lengths or non-numeric ids; pass a "
                          f"[batch, length] array (pad rows, with an attention_mask)")
    if arr.size and arr.dtype.kind not in "iub":
        if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ConfigError(f"{name}: token ids must be integers, got dtype {arr.dtype}")
    bad = np.argwhere((arr < 0) | (arr >= vocab_size)) if arr.size else []
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        raise ConfigError(f"{name}: id {int(arr[where])} at position "
                          f"{where if len(where) != 1 else where[0]} is outside [0, {vocab_size}) "
                          f"({size_name}={vocab_size}); ids must come from this model's tokenizer")
    return arr.astype(np.int32)


def check_length(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """ConfigError when the sequence to decode does not fit model.max_len (learned positions
    end there; RoPE/relative models were not trained beyond it)."""
    fix = "lower max_new_tokens"
    if cfg.position != "learned":
        fix += " or load the model with from_pretrained(..., max_len=N) to decode further"
    if cfg.architecture == "encoder_decoder":
        if max_new_tokens + 1 > cfg.max_len:
            raise ConfigError(f"max_new_tokens={max_new_tokens} (+1 start token) exceeds "
                              f"model.max_len={cfg.max_len}; {fix}")
        if cfg.position == "learned" and prompt_len > cfg.max_len:
            raise ConfigError(f"encoder input of {prompt_len} tokens exceeds model.max_len="
                              f"{cfg.max_len}; shorten it")
    elif prompt_len + max_new_tokens > cfg.max_len:
        raise ConfigError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                          f"{prompt_len + max_new_tokens} exceeds model.max_len={cfg.max_len}; "
                          f"shorten the prompt or {fix}")


def _zeros_cache(model: Transformer, *args, method=None) -> Any:
    shapes = abstract_variables(model, *args, method=method)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


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


def _as_rows(prompts: Any) -> list[Any]:
    """One sequence of ids per prompt (not yet checked or converted)."""
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        arr = np.asarray(prompts)
        return list(arr[None] if arr.ndim == 1 else arr)
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], numbers.Number):
        return [prompts]
    return [list(p) for p in prompts]


def _prompt_row(row: Any, vocab_size: int, index: int) -> list[int]:
    arr = check_token_ids(row, vocab_size, f"prompt {index}")
    if arr.ndim != 1:
        raise ConfigError(f"prompt {index}: expected a sequence of token ids, got an array of "
                          f"shape {arr.shape}")
    return arr.tolist()


def generate(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]] | np.ndarray,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: Optional[int | Sequence[int]] = None,
             pad_id: int = 0, seed: int = 0, decoder_start_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt (stopping at, and leaving out, an eos id).

    Decoder-only: `prompts` are the context. Encoder-decoder: `prompts` are the
    encoder inputs, and decoding starts from `decoder_start_id` (T5: pad = 0).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if cfg.architecture == "encoder":
        raise ConfigError(f"an encoder-only model ({cfg.family}) does not generate text: it has "
                          f"no decoder to predict the next token; use logits()/outputs() for "
                          f"its hidden states or MLM predictions")
    rows = _as_rows(prompts)
    if not rows or (cfg.architecture == "decoder" and any(len(r) == 0 for r in rows)):
        raise ConfigError("every prompt needs at least one token")
    rows = [_prompt_row(row, cfg.vocab_size, i) for i, row in enumerate(rows)]
    if cfg.architecture == "encoder_decoder":  # fed to the decoder as its first token
        check_token_ids([decoder_start_id], cfg.vocab_size, "decoder_start_id")
    check_length(cfg, max(len(r) for r in rows), max_new_tokens)
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
