"""The five model families against independent references (issue 2, "Must show").

Every test builds its expectation itself: published parameter counts and the
architecture formulas behind them, a float64 numpy implementation of
softmax(QK^T/sqrt(d_k))V, the same model run on each document alone, the
scanned model against the unrolled one, the full forward pass against KV-cache
decoding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from llmjax.config import model_config
from llmjax.models import (Transformer, abstract_params, param_count, stack_layers,
                           unstack_layers)
from llmjax.models.attention import Attention, make_mask
from llmjax.models.context import Context

DECODERS = ("gpt-tiny", "palm-tiny", "llama-tiny")
FAMILIES = DECODERS + ("bert-tiny", "t5-tiny")
ATOL = 1e-5
T = 8  # every full-row test uses [1, T] tokens, so each model compiles few shapes


def random_params(abstract, seed=0):
    """Concrete params of the given shapes, filled from numpy (no init compile).

    Norm scales near 1, everything else (kernels, biases, embeddings) non-zero,
    so biases and relative position tables take part in every comparison.
    """
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        noise = rng.normal(size=leaf.shape)
        name = jax.tree_util.keystr(path)
        value = 1.0 + 0.1 * noise if "scale" in name else 0.05 * noise
        return jnp.asarray(value, leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


class Model:
    """A tiny preset with random params and a jitted apply."""

    def __init__(self, name: str, **overrides):
        self.cfg = model_config(name, **overrides)
        self.module = Transformer(self.cfg)
        self.params = random_params(abstract_params(self.cfg))
        self._apply = jax.jit(self.module.apply)

    def __call__(self, tokens, params=None, **kwargs):
        variables = {"params": self.params if params is None else params}
        return self._apply(variables, jnp.asarray(tokens), **kwargs)


@functools.lru_cache(maxsize=None)
def model(name: str, **overrides) -> Model:
    return Model(name, **overrides)


def rand_tokens(shape, seed=0, vocab=512):
    return np.random.RandomState(seed).randint(1, vocab, size=shape).astype(np.int32)


def call(name, tokens, decoder_tokens=None, **kwargs):
    """Run a family; T5 gets decoder tokens, BERT always gets token types (fewer compiles)."""
    m = model(name)
    tokens = np.asarray(tokens)
    if m.cfg.architecture == "encoder_decoder":
        kwargs["decoder_tokens"] = jnp.asarray(tokens if decoder_tokens is None else decoder_tokens)
    if m.cfg.num_token_types and "token_types" not in kwargs:
        kwargs["token_types"] = jnp.zeros(tokens.shape, jnp.int32)
    return m(tokens, **kwargs)


# ----------------------------------------------------------------------------
# 1. Parameter counts (abstract init: jax.eval_shape, no memory).

def count(name: str) -> int:
    return param_count(abstract_params(model_config(name)))


@pytest.mark.parametrize("name, published", [
    ("gpt2-small", 124_439_808),  # HF GPT2LMHeadModel("gpt2"), tied head counted once
    ("gpt2-medium", 354_823_168),  # HF "gpt2-medium"
    ("llama2-7b", 6_738_415_616),  # meta-llama/Llama-2-7b-hf
    ("llama2-70b", 68_976_648_192),  # meta-llama/Llama-2-70b-hf
    ("llama3.1-8b", 8_030_261_248),  # meta-llama/Llama-3.1-8B
    ("bert-base", 110_106_428),  # HF BertForPreTraining("bert-base-uncased")
    ("t5-v1_1-small", 76_961_152),  # HF T5ForConditionalGeneration("google/t5-v1_1-small")
    ("smollm2-135m", 134_515_008),  # HuggingFaceTB/SmolLM2-135M
])
def test_param_count_equals_published_figure(name, published):
    assert count(name) == published


def test_gpt2_small_param_count_matches_architecture_formula():
    cfg = model_config("gpt2-small")
    V, d, L, ctx, ff = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.max_len, cfg.d_ff
    embeddings = V * d + ctx * d  # tokens (tied with the LM head) + learned positions
    attention = 4 * (d * d + d)  # W^Q, W^K, W^V, W^O with biases
    mlp = d * ff + ff + ff * d + d
    norms = 2 * 2 * d  # two LayerNorms (scale + bias) per block
    expected = embeddings + L * (attention + mlp + norms) + 2 * d  # + final LayerNorm
    assert count("gpt2-small") == expected


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-70b", "smollm2-135m"])
def test_llama_param_count_matches_architecture_formula(name):
    cfg = model_config(name)
    V, d, L, ff = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff
    h, kv, dh = cfg.num_heads, cfg.num_kv_heads, d // cfg.num_heads
    attention = d * h * dh + 2 * d * kv * dh + h * dh * d  # GQA: K, V have kv heads
    mlp = 3 * d * ff  # SwiGLU: gate, up, down
    head = 0 if cfg.tie_embeddings else V * d
    expected = V * d + head + L * (attention + mlp + 2 * d) + d  # RMSNorms: scale only
    assert count(name) == expected


def test_bert_base_param_count_matches_architecture_formula():
    cfg = model_config("bert-base")
    V, d, L, ff, ctx = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff, cfg.max_len
    embeddings = V * d + ctx * d + 2 * d + 2 * d  # tokens, positions, token types, LayerNorm
    layer = 4 * (d * d + d) + (d * ff + ff + ff * d + d) + 2 * 2 * d
    pooler = d * d + d
    mlm = d * d + d + 2 * d + V  # transform, LayerNorm, output bias (decoder tied)
    nsp = 2 * d + 2
    assert count("bert-base") == embeddings + L * layer + pooler + mlm + nsp


def test_t5_small_param_count_matches_architecture_formula():
    cfg = model_config("t5-v1_1-small")
    V, d, L, ff = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff
    inner = cfg.num_heads * cfg.head_dim  # 6 x 64 = 384 != d_model
    attention = 4 * d * inner
    mlp = 3 * d * ff  # gated-GELU
    relative = cfg.relative_buckets * cfg.num_heads  # one table per stack
    encoder = L * (attention + mlp + 2 * d) + d + relative
    decoder = L * (2 * attention + mlp + 3 * d) + d + relative
    expected = V * d + V * d + encoder + decoder  # shared embedding + untied LM head
    assert count("t5-v1_1-small") == expected


def test_abstract_init_allocates_no_arrays():
    tree = abstract_params(model_config("llama2-7b"))
    leaves = jax.tree.leaves(tree)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


# ----------------------------------------------------------------------------
# 2. Attention against numpy: softmax(QK^T / sqrt(d_k)) V per head, concat, W^O.

def numpy_attention(p, x, mask=None, rope_positions=None, theta=10000.0):
    """float64 reference of one attention layer; p holds the layer's kernels (and biases)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    wq, wk, wv, wo = (p[n]["kernel"] for n in ("query", "key", "value", "out"))
    heads, dk = wq.shape[1], wq.shape[2]
    kv_heads = wk.shape[1]
    group = heads // kv_heads
    out = np.zeros((b, t, wo.shape[-1]))
    for i in range(b):
        concat = []
        for h in range(heads):
            g = h // group  # the key/value head this query head shares
            q = x[i] @ wq[:, h, :]
            k = x[i] @ wk[:, g, :]
            v = x[i] @ wv[:, g, :]
            if "bias" in p["query"]:
                q, k, v = q + p["query"]["bias"][h], k + p["key"]["bias"][g], v + p["value"]["bias"][g]
            if rope_positions is not None:
                q, k = numpy_rope(q, rope_positions[i], theta), numpy_rope(k, rope_positions[i], theta)
            scores = q @ k.T / np.sqrt(dk)
            if mask is not None:
                scores = np.where(mask[i], scores, -np.inf)
            scores = scores - scores.max(-1, keepdims=True)
            weights = np.exp(scores)
            weights /= weights.sum(-1, keepdims=True)
            concat.append(weights @ v)
        concat = np.concatenate(concat, axis=-1)  # [t, heads * dk]
        out[i] = concat @ wo.reshape(heads * dk, -1)
        if "bias" in p["out"]:
            out[i] += p["out"]["bias"]
    return out


def numpy_rope(x, positions, theta):
    """Rotary embedding, half-split layout (HF LLaMA's rotate_half)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    angle = positions[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([angle, angle], -1)), np.sin(np.concatenate([angle, angle], -1))
    rotated = np.concatenate([-x[:, d // 2:], x[:, : d // 2]], -1)
    return x * cos + rotated * sin


def layer_params(params, layer=0):
    """One layer's attention params from the scanned tree (leading layer axis)."""
    return jax.tree.map(lambda a: a[layer], params["decoder"]["layers"]["attention"])


def run_attention(cfg, p, x, mask, positions):
    return Attention(cfg).apply({"params": p}, x, Context(positions=positions, mask=mask))


def random_attention_params(cfg, seed):
    """Layer 1's attention params of a (scanned) model of this config, filled at random."""
    params = random_params(abstract_params(cfg), seed)
    return jax.tree.map(lambda a: 6 * a, layer_params(params, layer=1))  # std 0.3: peaky softmax


ATTENTION_KINDS = {"mha": None, "gqa": 2, "mqa": 1}


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("kind", list(ATTENTION_KINDS))
def test_attention_equals_numpy_formula(kind, masked):
    cfg = model_config("gpt-tiny", num_kv_heads=ATTENTION_KINDS[kind])
    p = random_attention_params(cfg, seed=1)
    assert p["key"]["kernel"].shape[1] == cfg.kv_heads
    b, t = 2, 7
    x = np.random.RandomState(2).normal(size=(b, t, cfg.d_model)).astype(np.float32)
    mask = None
    if masked:  # causal, and row 1 holds two packed documents (no attention across them)
        causal = np.tril(np.ones((t, t), bool))
        docs = np.array([[1] * 7, [1, 1, 1, 2, 2, 2, 2]])
        mask = causal[None] & (docs[:, :, None] == docs[:, None, :])
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    got = run_attention(cfg, p, jnp.asarray(x),
                        None if mask is None else jnp.asarray(mask)[:, None], positions)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(p, x, mask), atol=1e-4, rtol=1e-4)


def test_rope_gqa_attention_equals_numpy_formula():
    cfg = model_config("llama-tiny")
    p = random_attention_params(cfg, seed=3)
    b, t = 2, 6
    x = np.random.RandomState(4).normal(size=(b, t, cfg.d_model)).astype(np.float32)
    positions = np.array([np.arange(t), np.arange(3, 3 + t)])
    mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    got = run_attention(cfg, p, jnp.asarray(x), jnp.asarray(mask)[:, None], jnp.asarray(positions))
    want = numpy_attention(p, x, mask, rope_positions=positions, theta=cfg.rope_theta)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_make_mask_matches_definition():
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    prefix = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
    got = np.asarray(make_mask(jnp.asarray(seg), jnp.asarray(seg), True, jnp.asarray(prefix)))
    want = np.zeros((2, 1, 6, 6), bool)
    for b in range(2):
        for q in range(6):
            for k in range(6):
                same_doc = seg[b, q] == seg[b, k] and seg[b, k] != 0
                order = k <= q or (prefix[b, q] and prefix[b, k])
                want[b, 0, q, k] = same_doc and order
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------
# 3. Causality. Row variants: token i changed (one apply each, same compiled shape).

def variants(tokens, positions):
    for i in positions:
        changed = tokens.copy()
        changed[0, i] = changed[0, i] % 500 + 3
        yield i, changed


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_changing_token_t_never_changes_earlier_outputs(name):
    tokens = rand_tokens((1, T), seed=6)
    base = np.asarray(call(name, tokens)["logits"])
    for i, changed in variants(tokens, range(T)):
        out = np.asarray(call(name, changed)["logits"])
        np.testing.assert_allclose(out[:, :i], base[:, :i], atol=1e-6,
                                   err_msg=f"changing token {i} changed an earlier output")
        assert not np.allclose(out[:, i:], base[:, i:], atol=1e-6), f"token {i} had no effect"


def test_t5_decoder_changing_token_t_never_changes_earlier_outputs():
    enc, dec = rand_tokens((1, T), seed=7), rand_tokens((1, T), seed=8)
    base = np.asarray(call("t5-tiny", enc, decoder_tokens=dec)["logits"])
    for i, changed in variants(dec, range(T)):
        out = np.asarray(call("t5-tiny", enc, decoder_tokens=changed)["logits"])
        np.testing.assert_allclose(out[:, :i], base[:, :i], atol=1e-6)
        assert not np.allclose(out[:, i:], base[:, i:], atol=1e-6)


def test_t5_encoder_is_bidirectional():
    enc, dec = rand_tokens((1, T), seed=9), rand_tokens((1, T), seed=10)
    base = np.asarray(call("t5-tiny", enc, decoder_tokens=dec)["logits"])
    (_, changed), = variants(enc, [T - 1])
    out = np.asarray(call("t5-tiny", changed, decoder_tokens=dec)["logits"])
    assert not np.allclose(out[0, 0], base[0, 0], atol=1e-6)  # first target sees the last input


def test_bert_encoder_is_bidirectional():
    tokens = rand_tokens((1, T), seed=11)
    base = np.asarray(call("bert-tiny", tokens)["hidden"])
    (_, changed), = variants(tokens, [T - 1])
    assert not np.allclose(np.asarray(call("bert-tiny", changed)["hidden"])[0, 0], base[0, 0],
                           atol=1e-6)


PREFIX = 5


def prefix_lm(name, tokens):
    mask = jnp.asarray((np.arange(T) < PREFIX)[None])
    return np.asarray(call(name, tokens, prefix_mask=mask)["logits"])


@pytest.mark.parametrize("name", DECODERS)
def test_prefix_lm_prefix_positions_see_later_prefix_tokens(name):
    tokens = rand_tokens((1, T), seed=12)
    base = prefix_lm(name, tokens)
    for i, changed in variants(tokens, range(1, PREFIX)):
        assert not np.allclose(prefix_lm(name, changed)[:, :i], base[:, :i], atol=1e-6), (
            f"prefix token {i} is invisible to earlier prefix positions")


@pytest.mark.parametrize("name", DECODERS)
def test_prefix_lm_targets_never_change_earlier_outputs(name):
    tokens = rand_tokens((1, T), seed=13)
    base = prefix_lm(name, tokens)
    for i, changed in variants(tokens, range(PREFIX, T)):
        out = prefix_lm(name, changed)
        np.testing.assert_allclose(out[:, :i], base[:, :i], atol=1e-6)
        assert not np.allclose(out[:, i:], base[:, i:], atol=1e-6)


def test_prefix_lm_with_empty_prefix_is_causal_lm():
    tokens = rand_tokens((1, T), seed=14)
    empty = call("gpt-tiny", tokens, prefix_mask=jnp.zeros((1, T), bool))["logits"]
    np.testing.assert_allclose(np.asarray(empty), np.asarray(call("gpt-tiny", tokens)["logits"]),
                               atol=1e-6)


# ----------------------------------------------------------------------------
# 4. Padding and packing: documents of 5 and 3 tokens packed into one row of T = 8.

DOC_A, DOC_B = rand_tokens((1, 5), seed=15), rand_tokens((1, 3), seed=16)
TYPES_A, TYPES_B = np.array([[0, 0, 0, 1, 1]]), np.array([[0, 1, 1]])
PACKED_SEGMENTS = jnp.asarray([[1] * 5 + [2] * 3])
PADDED_SEGMENTS = jnp.asarray([[1] * 5 + [0] * 3])
COMPARED = ("logits", "hidden")


def assert_same(got, want, sl):
    keys = [k for k in COMPARED if k in want]
    assert keys
    for key in keys:
        np.testing.assert_allclose(np.asarray(got[key])[:, sl], np.asarray(want[key]),
                                   atol=ATOL, rtol=ATOL, err_msg=key)


def pad(tokens, n=T):
    return np.pad(tokens, ((0, 0), (0, n - tokens.shape[1])))


@pytest.mark.parametrize("name", DECODERS)
def test_packed_row_equals_each_document_alone(name):
    out = call(name, np.concatenate([DOC_A, DOC_B], 1), segment_ids=PACKED_SEGMENTS)
    assert_same(out, call(name, DOC_A), slice(0, 5))
    assert_same(out, call(name, DOC_B), slice(5, T))


def test_bert_packed_row_equals_each_document_alone():
    types = jnp.asarray(np.concatenate([TYPES_A, TYPES_B], 1))
    out = call("bert-tiny", np.concatenate([DOC_A, DOC_B], 1), segment_ids=PACKED_SEGMENTS,
               token_types=types)
    assert_same(out, call("bert-tiny", DOC_A, token_types=jnp.asarray(TYPES_A)), slice(0, 5))
    assert_same(out, call("bert-tiny", DOC_B, token_types=jnp.asarray(TYPES_B)), slice(5, T))


T5_DEC_A, T5_DEC_B = rand_tokens((1, 4), seed=17), rand_tokens((1, 4), seed=18)


def test_t5_packed_encoder_and_decoder_equal_each_document_alone():
    out = call("t5-tiny", np.concatenate([DOC_A, DOC_B], 1),
               decoder_tokens=np.concatenate([T5_DEC_A, T5_DEC_B], 1),
               segment_ids=PACKED_SEGMENTS, decoder_segment_ids=jnp.asarray([[1] * 4 + [2] * 4]))
    assert_same(out, call("t5-tiny", DOC_A, decoder_tokens=T5_DEC_A), slice(0, 4))
    assert_same(out, call("t5-tiny", DOC_B, decoder_tokens=T5_DEC_B), slice(4, T))


def test_default_positions_restart_per_document():
    from llmjax.models.transformer import default_positions
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
    np.testing.assert_array_equal(np.asarray(default_positions(seg)),
                                  [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 0, 1, 2]])


@pytest.mark.parametrize("name", DECODERS)
def test_right_padded_row_equals_unpadded_on_real_tokens(name):
    out = call(name, pad(DOC_A), segment_ids=PADDED_SEGMENTS)
    assert_same(out, call(name, DOC_A), slice(0, 5))
    assert np.all(np.isfinite(np.asarray(out["logits"])))  # pad rows: uniform softmax, no NaN


def test_bert_right_padded_row_equals_unpadded():
    out = call("bert-tiny", pad(DOC_A), segment_ids=PADDED_SEGMENTS,
               token_types=jnp.asarray(pad(TYPES_A)))
    alone = call("bert-tiny", DOC_A, token_types=jnp.asarray(TYPES_A))
    assert_same(out, alone, slice(0, 5))
    for key in ("pooled", "nsp_logits"):  # [CLS]-based heads ignore the padding too
        np.testing.assert_allclose(np.asarray(out[key]), np.asarray(alone[key]), atol=ATOL)


def test_t5_right_padded_encoder_and_decoder_equal_unpadded():
    out = call("t5-tiny", pad(DOC_A), decoder_tokens=pad(T5_DEC_A), segment_ids=PADDED_SEGMENTS,
               decoder_segment_ids=jnp.asarray([[1] * 4 + [0] * 4]))
    assert_same(out, call("t5-tiny", DOC_A, decoder_tokens=T5_DEC_A), slice(0, 4))


# ----------------------------------------------------------------------------
# 5. scan vs unrolled layers; remat policies.

@pytest.mark.parametrize("name", FAMILIES)
def test_unstacked_params_match_unrolled_model_tree(name):
    unstacked = unstack_layers(model(name).params)
    unrolled = nn.unbox(abstract_params(model_config(name, scan_layers=False)))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    assert shapes(unstacked) == shapes(unrolled)


def test_stack_layers_inverts_unstack_layers():
    params = model("t5-tiny").params
    back = stack_layers(unstack_layers(params))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", FAMILIES)
def test_scan_and_unrolled_layers_give_same_outputs(name):
    scanned, unrolled = model(name), model(name, scan_layers=False)
    tokens, dec = rand_tokens((1, T), seed=19), rand_tokens((1, T), seed=20)
    kwargs = {"decoder_tokens": jnp.asarray(dec)} if name == "t5-tiny" else {}
    if scanned.cfg.num_token_types:
        kwargs["token_types"] = jnp.zeros((1, T), jnp.int32)
    a = scanned(tokens, **kwargs)
    b = unrolled(tokens, params=unstack_layers(scanned.params), **kwargs)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), atol=ATOL, rtol=ATOL,
                                   err_msg=key)


REMAT_MODEL = "llama-tiny"


@functools.lru_cache(maxsize=None)
def loss_and_grads(remat: str, scan: bool = True):
    """Loss and gradients of llama-tiny (scanned params) under a remat policy."""
    m = model(REMAT_MODEL, remat=remat, scan_layers=scan)
    tokens = jnp.asarray(rand_tokens((1, T), seed=21))

    def loss(p):
        out = m.module.apply({"params": p}, tokens)
        return jnp.mean(out["logits"] ** 2) + jnp.mean(out["hidden"] ** 2)

    params = model(REMAT_MODEL).params
    if scan:
        return jax.jit(jax.value_and_grad(loss))(params)
    value, grads = jax.jit(jax.value_and_grad(loss))(unstack_layers(params))
    return value, stack_layers(grads)


def assert_same_loss_and_grads(got, want):
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    assert jax.tree.structure(got[1]) == jax.tree.structure(want[1])
    for x, y in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policy_gives_same_loss_and_gradients_as_none(policy):
    assert_same_loss_and_grads(loss_and_grads(policy), loss_and_grads("none"))


def test_remat_unrolled_layers_give_same_gradients_as_scanned_without_remat():
    assert_same_loss_and_grads(loss_and_grads("full", scan=False), loss_and_grads("none"))


# ----------------------------------------------------------------------------
# 7. KV-cache decoding equals the full forward pass.

@functools.lru_cache(maxsize=None)
def decoder_step(name):
    """(empty cache, jitted step) for decoding `name` with a KV cache, batch 1."""
    m = model(name)
    dec = Transformer(m.cfg, decode=True)
    one = jnp.zeros((1, 1), jnp.int32)
    if m.cfg.architecture == "encoder_decoder":
        def run(variables, encoder_tokens, chunk, positions, **kw):
            return dec.apply(variables, encoder_tokens, decoder_tokens=chunk,
                             decoder_positions=positions, **kw)
    else:
        def run(variables, encoder_tokens, chunk, positions, **kw):
            return dec.apply(variables, chunk, positions=positions, **kw)
    # The cache's shapes, from an abstract init (no compile, no memory), then zeros.
    shapes = jax.eval_shape(lambda: dec.init(jax.random.key(0), one, decoder_tokens=one)
                            if m.cfg.architecture == "encoder_decoder"
                            else dec.init(jax.random.key(0), one))["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    @jax.jit
    def step(cache, encoder_tokens, chunk, positions):
        out, state = run({"params": m.params, "cache": cache}, encoder_tokens, chunk, positions,
                         mutable=["cache"])
        return out["logits"], state["cache"]
    return cache, step


def decode_incrementally(name, tokens, chunks, encoder_tokens=None):
    """Feed `tokens` through the KV cache in chunks (prefill, then steps); concat logits."""
    cache, step = decoder_step(name)
    logits, start = [], 0
    for n in chunks:
        positions = jnp.arange(start, start + n)[None]
        out, cache = step(cache, encoder_tokens, jnp.asarray(tokens[:, start:start + n]),
                          positions)
        logits.append(np.asarray(out))
        start += n
    assert start == tokens.shape[1]
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("name", DECODERS)
def test_kv_cache_decoding_token_by_token_equals_full_forward(name):
    tokens = rand_tokens((1, T), seed=22)
    full = np.asarray(call(name, tokens)["logits"])
    np.testing.assert_allclose(decode_incrementally(name, tokens, [1] * T), full,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_kv_cache_prefill_then_steps_equals_full_forward(name):
    tokens = rand_tokens((1, T), seed=23)
    full = np.asarray(call(name, tokens)["logits"])
    np.testing.assert_allclose(decode_incrementally(name, tokens, [5, 1, 1, 1]), full,
                               atol=1e-4, rtol=1e-4)


def test_t5_kv_cache_decoding_token_by_token_equals_full_forward():
    enc, dec = rand_tokens((1, T), seed=24), rand_tokens((1, T), seed=25)
    full = np.asarray(call("t5-tiny", enc, decoder_tokens=dec)["logits"])
    got = decode_incrementally("t5-tiny", dec, [1] * T, encoder_tokens=jnp.asarray(enc))
    np.testing.assert_allclose(got, full, atol=1e-4, rtol=1e-4)
