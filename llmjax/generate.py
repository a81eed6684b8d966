"""Autoregressive decoding with the KV cache: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded; padding gets segment id 0, so
the cache never shows it to a query, and positions count real tokens only.
The prompt is written to the cache in one call (prefill); the new tokens come
from a `lax.while_loop` over a fixed budget inside the same jitted call, which
stops once every row has met an end id: no host round trip per token (the
streaming path, `on_token`, reads each token back instead). With a mesh, rows
shard over data*fsdp and the KV cache's heads over `tensor`, as the key/value
projections do. Encoder-decoder models encode once and decode from
`decoder_start_id`. Compiled programs are cached per (config, sampling, mesh).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from llmjax.config import ConfigError, ModelConfig
from llmjax.models.transformer import Transformer
from llmjax.parallel import DEFAULT_RULES, logical_shardings, param_shardings
from llmjax.tree import abstract_variables, unstack_layers

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
    # Layers unrolled: under nn.scan every step slices and rewrites the stacked cache, which
    # made decoding 2-4x slower (reference GPT, CPU); stacked params are unstacked in the jit.
    if cfg.position == "learned":
        return dataclasses.replace(cfg, dropout=0.0, scan_layers=False)
    size = -(-needed // 16) * 16
    return dataclasses.replace(cfg, max_len=size, dropout=0.0, scan_layers=False)


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


def _cache_names(path: tuple, shape: tuple) -> tuple:
    """Logical names of a KV-cache leaf: batch rows and key/value heads, behind an optional
    stacked-layers axis (scan_layers)."""
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    base = {"cached_key": ("batch", "length", "kv_heads", "kv"),
            "cached_value": ("batch", "length", "kv_heads", "kv"),
            "segments": ("batch", "length")}.get(name, ())
    lead = len(shape) - len(base)
    return ("layers",) * lead + base if lead >= 0 else (None,) * len(shape)


def cache_shardings(cache: Any, mesh: Mesh, rules: Sequence = DEFAULT_RULES) -> Any:
    """NamedShardings for a KV cache: rows over data*fsdp, key/value heads over `tensor`
    (as the rules shard the key/value projections), replicated where a size does not divide."""
    names = jax.tree_util.tree_map_with_path(lambda path, leaf: P(*_cache_names(path, leaf.shape)),
                                             cache)
    return logical_shardings(names, cache, mesh, rules)


def shard_params(cfg: ModelConfig, params: Params, mesh: Mesh,
                 rules: Sequence = DEFAULT_RULES) -> Params:
    """`params` placed on `mesh` by the model's logical axis names (the training layout)."""
    from llmjax.models.api import abstract_params

    return jax.device_put(params, param_shardings(abstract_params(cfg), mesh, rules))


class _Program:
    """The jitted pieces of one decoding setup (config, sampling, mesh).

    `start` runs the prompt (prefill, or encode + the first decoder step) and samples the
    first token; `step` samples one more; `run` is start plus a `lax.while_loop` over a
    fixed budget that stops when every row has met an end id: one dispatch, no host round
    trip per token.
    """

    def __init__(self, cfg: ModelConfig, temperature: float, top_k: int, top_p: float,
                 mesh: Optional[Mesh], rules: Sequence, decoder_start_id: int = 0,
                 stacked: bool = False):
        self.cfg, self.mesh, self.rules = cfg, mesh, tuple(rules)
        layout = unstack_layers if stacked else (lambda params: params)  # params as given
        self.decoder_start_id = int(decoder_start_id)
        self.model = model = Transformer(cfg, decode=True)
        self.encoder = cfg.architecture == "encoder_decoder"
        pick = lambda logits, rng: sample_logits(logits, rng, temperature, top_k, top_p)  # noqa: E731

        def last_logits(params, hidden):
            # Only the last position's logits: [b, vocab], not [b, t, vocab] for the prompt.
            return model.apply({"params": params}, hidden[:, -1:],
                               method=Transformer.lm_logits)[:, -1]

        def constrain_cache(cache):
            if mesh is None:
                return cache
            return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh, rules))

        def start(params, tokens, segments, positions, rng):
            b = tokens.shape[0]
            if self.encoder:
                encoded, enc_seg, enc_pos = Transformer(cfg).apply(
                    {"params": params}, tokens, segments, method=Transformer.encode)
                ctx = (encoded, enc_seg, enc_pos)
                first = jnp.full((b, 1), self.decoder_start_id, jnp.int32)
                cache = constrain_cache(_zeros_cache(model, first, *ctx,
                                                     method=Transformer.decode_step))
                pos = jnp.zeros((b, 1), jnp.int32)
                logits, cache = step_logits(params, cache, first, pos, ctx)
                return pick(logits, rng), cache, pos + 1, ctx
            cache = constrain_cache(_zeros_cache(model, tokens[:, :1]))
            out, vars_ = model.apply({"params": params, "cache": cache}, tokens,
                                     segment_ids=segments, positions=positions, logits=False,
                                     mutable=["cache"])
            logits = last_logits(params, out["hidden"])
            return pick(logits, rng), constrain_cache(vars_["cache"]), positions[:, -1:] + 1, ()

        def step_logits(params, cache, token, pos, ctx):
            variables = {"params": params, "cache": cache}
            if self.encoder:
                out, vars_ = model.apply(variables, token, *ctx, jnp.ones_like(token), pos,
                                         logits=False, method=Transformer.decode_step,
                                         mutable=["cache"])
            else:
                out, vars_ = model.apply(variables, token, segment_ids=jnp.ones_like(token),
                                         positions=pos, logits=False, mutable=["cache"])
            return last_logits(params, out["hidden"]), constrain_cache(vars_["cache"])

        def step(params, cache, token, pos, ctx, rng):
            logits, cache = step_logits(params, cache, token[:, None], pos, ctx)
            return pick(logits, rng), cache

        def run(params, tokens, segments, positions, rng, end_ids, budget):
            rng, key = jax.random.split(rng)
            token, cache, pos, ctx = start(params, tokens, segments, positions, key)
            b = tokens.shape[0]
            done = jnp.isin(token, end_ids)
            out = jnp.full((b, budget), -1, jnp.int32).at[:, 0].set(jnp.where(done, -1, token))

            def cond(state):
                t, _, _, _, done, _, _ = state
                return (t < budget) & ~jnp.all(done)

            def body(state):
                t, token, cache, pos, done, out, rng = state
                rng, key = jax.random.split(rng)
                token, cache = step(params, cache, token, pos, ctx, key)
                done = done | jnp.isin(token, end_ids)
                out = jax.lax.dynamic_update_slice(
                    out, jnp.where(done, -1, token)[:, None], (0, t))
                return t + 1, token, cache, pos + 1, done, out, rng

            state = (jnp.int32(1), token, cache, pos, done, out, rng)
            return jax.lax.while_loop(cond, body, state)[5]

        # The streaming path lays the params out once per call (`layout`), not once per token:
        # slicing stacked layers inside every step copies every weight every step.
        self.layout = jax.jit(layout)
        self.start = jax.jit(start)
        self.step = jax.jit(step)
        self.run = jax.jit(lambda params, *args, budget: run(layout(params), *args, budget),
                           static_argnames="budget")

    def context(self):
        """Mesh and logical rules for tracing (the model's activation constraints)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack


def _program(cfg: ModelConfig, temperature: float, top_k: int, top_p: float,
             mesh: Optional[Mesh], rules: Sequence, decoder_start_id: int,
             stacked: bool) -> _Program:
    key = (repr(cfg), float(temperature), int(top_k), float(top_p), mesh, tuple(rules),
           int(decoder_start_id), stacked)
    if key not in _COMPILED:
        _COMPILED[key] = _Program(cfg, temperature, top_k, top_p, mesh, rules, decoder_start_id,
                                  stacked)
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


def _end_ids(eos_id: Optional[int | Sequence[int]]) -> np.ndarray:
    ids = [] if eos_id is None else ([int(eos_id)] if np.isscalar(eos_id)
                                     else [int(e) for e in eos_id])
    return np.asarray(sorted(set(ids)) or [-1], np.int32)  # -1: never sampled


def _batch_rows(rows: list[list[int]], pad_id: int, encoder: bool, multiple: int,
                cap: int):
    """Tokens, segments and positions [b, longest]: decoder prompts left-padded (the next
    token of every row lands at the same cache index), encoder inputs right-padded; the
    batch padded with one-token dummy rows to a multiple of the mesh's batch axes."""
    # `cap`: the longest padded prompt the cache has room for (learned positions: a cache of
    # max_len, which check_length has held prompt + new tokens to).
    b = -(-len(rows) // multiple) * multiple
    # Prompt lengths rounded up to 16 (more left padding): nearby lengths share one compile.
    longest = max(len(r) for r in rows)
    longest = max(longest, min(-(-longest // 16) * 16, cap))
    tokens = np.full((b, longest), pad_id, np.int32)
    segments = np.zeros((b, longest), np.int32)
    for i, row in enumerate(rows + [[pad_id]] * (b - len(rows))):
        if encoder:
            tokens[i, :len(row)], segments[i, :len(row)] = row, 1
        else:
            tokens[i, longest - len(row):], segments[i, longest - len(row):] = row, 1
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    return tokens, segments, positions


def generate(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]] | np.ndarray,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: Optional[int | Sequence[int]] = None,
             pad_id: int = 0, seed: int = 0, decoder_start_id: int = 0,
             mesh: Optional[Mesh] = None, rules: Sequence = DEFAULT_RULES,
             on_token: Optional[Callable[[list[Optional[int]]], None]] = None
             ) -> list[list[int]]:
    """New token ids for each prompt (stopping at, and leaving out, an eos id).

    Decoder-only: `prompts` are the context. Encoder-decoder: `prompts` are the
    encoder inputs, and decoding starts from `decoder_start_id` (T5: pad = 0).
    `mesh`: decode sharded (rows over data*fsdp, heads and KV-cache heads over tensor);
    params are placed on it by their logical names. `on_token(ids)`: streaming, called after
    every step with each row's new id (None for a finished row); this path reads each token
    back to the host, the default path runs the whole loop on the device.
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
    encoder = cfg.architecture == "encoder_decoder"
    if encoder:  # fed to the decoder as its first token
        check_token_ids([decoder_start_id], cfg.vocab_size, "decoder_start_id")
    check_length(cfg, max(len(r) for r in rows), max_new_tokens)
    multiple = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
    cap = cfg.max_len - max_new_tokens if cfg.position == "learned" else 1 << 30
    tokens, segments, positions = _batch_rows(rows, pad_id, encoder, multiple, cap)
    needed = (max_new_tokens + 1) if encoder else tokens.shape[1] + max_new_tokens
    program = _program(_decode_config(cfg, needed), temperature, top_k, top_p, mesh, rules,
                       decoder_start_id, cfg.scan_layers)
    if mesh is not None:
        params = shard_params(cfg, params, mesh, rules)
    end_ids = _end_ids(eos_id)
    rng = jax.random.key(seed)
    with program.context():
        if on_token is None:
            out = _to_host(program.run(params, tokens, segments, positions, rng, end_ids,
                                       budget=max_new_tokens))
            return [_until_end(row) for row in out[:len(rows)]]
        return _stream(program, params, tokens, segments, positions, rng, set(end_ids.tolist()),
                       max_new_tokens, len(rows), on_token)


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, also when its rows are spread over several processes
    (every process runs the same decoding and gets every row)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _until_end(row: np.ndarray) -> list[int]:
    """A row of the device loop's output up to its first -1 (end id met, or rows done)."""
    ended = np.flatnonzero(row < 0)
    return row[:ended[0] if len(ended) else len(row)].tolist()


def _stream(program, params, tokens, segments, positions, rng, end_ids, budget, n, on_token):
    """The per-token host loop: each new id is shown as soon as it is sampled."""
    params = program.layout(params)
    rng, key = jax.random.split(rng)
    token, cache, pos, ctx = program.start(params, tokens, segments, positions, key)
    out: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for t in range(budget):
        ids = np.asarray(token).tolist()
        shown: list[Optional[int]] = []
        for i in range(n):
            if not done[i] and ids[i] in end_ids:
                done[i] = True
            shown.append(None if done[i] else ids[i])
            if not done[i]:
                out[i].append(ids[i])
        on_token(shown)
        if all(done) or t == budget - 1:
            break
        rng, key = jax.random.split(rng)
        token, cache = program.step(params, cache, token, pos, ctx, key)
        pos = pos + 1
    return out
