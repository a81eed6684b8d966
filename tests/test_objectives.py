"""Objectives against their definitions, on large random batches (issue 3, "Must show").

No model is involved: each test calls `objective.prepare` under jit on a batch
built here with numpy, and checks the prepared inputs, targets and weights
against the published definition (BERT MLM/NSP, T5 span corruption, causal
and prefix LM) computed independently in the test. Statistical bounds are
about 5 standard deviations wide.
"""
from __future__ import annotations

import numpy as np
import jax
import pytest

from llmjax import objectives
from llmjax.config import ConfigError, ObjectiveConfig, model_config
from llmjax.data.tokenizer import SpecialTokens

SPECIAL = SpecialTokens()
VOCAB = 512  # the tiny presets
FIRST = SPECIAL.num_special  # ids below this are special


def build(name: str, model: str = "gpt-tiny", **cfg):
    return objectives.build(ObjectiveConfig(name=name, **cfg), model_config(model), SPECIAL)


def prepare(obj, batch: dict, seed: int = 0) -> dict:
    out = jax.jit(obj.prepare)({k: np.asarray(v) for k, v in batch.items()}, jax.random.key(seed))
    return {k: np.asarray(v) for k, v in out.items()}


def packed_lm_batch(rows: int, length: int, seed: int = 0, min_doc: int = 2, max_doc: int = 40,
                    specials: bool = True) -> dict:
    """Rows packed with documents of random lengths (each ending in eos), random tail padding.

    Like the data pipeline's "lm" batches: segment ids 1, 2, ... per document,
    0 on padding; positions restart at every document. With `specials`, a few
    [CLS]/[SEP]/[UNK] ids are sprinkled inside documents too.
    """
    rng = np.random.RandomState(seed)
    tokens = np.zeros((rows, length), np.int32)
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    for r in range(rows):
        end = length - rng.randint(0, length // 4) if rng.rand() < 0.5 else length
        start, doc = 0, 1
        while start < end:
            n = min(rng.randint(min_doc, max_doc + 1), end - start)
            tokens[r, start:start + n] = rng.randint(FIRST, VOCAB, n)
            tokens[r, start + n - 1] = SPECIAL.eos
            seg[r, start:start + n] = doc
            pos[r, start:start + n] = np.arange(n)
            start, doc = start + n, doc + 1
    if specials:
        sprinkle = (rng.rand(rows, length) < 0.02) & (seg != 0)
        tokens[sprinkle] = rng.choice([SPECIAL.cls, SPECIAL.sep, SPECIAL.unk], sprinkle.sum())
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def clm_reference(tokens, seg):
    """Python-loop reference: position t predicts t+1 iff both lie in the same document."""
    rows, length = tokens.shape
    targets = np.zeros_like(tokens)
    weights = np.zeros(tokens.shape, np.float32)
    for r in range(rows):
        for t in range(length - 1):
            targets[r, t] = tokens[r, t + 1]
            weights[r, t] = float(seg[r, t] != 0 and seg[r, t + 1] == seg[r, t])
    return targets, weights


# ------------------------------------------------------------------ registry


def test_registry_names_and_architectures():
    assert {"clm", "prefix_lm", "sft", "mlm", "nsp", "span_corruption", "seq2seq",
            "classification"} <= set(objectives.registered())
    assert build("clm").architectures == ("decoder",)
    assert build("mlm", "bert-tiny").architectures == ("encoder",)
    assert build("span_corruption", "t5-tiny").architectures == ("encoder_decoder",)
    composite = build("mlm+nsp", "bert-tiny", weights=[1.0, 0.5])
    assert [p.name for p in composite.parts] == ["nsp", "mlm"]  # rows built before masking
    assert composite.term_weights == {"mlm": 1.0, "nsp": 0.5}
    with pytest.raises(ConfigError, match="did you mean 'mlm'"):
        build("mlmm", "bert-tiny")


# ------------------------------------------------------------------ causal / prefix LM


def test_clm_no_loss_across_packed_documents():
    batch = packed_lm_batch(64, 96, seed=1)
    out = prepare(build("clm"), batch)
    targets, weights = clm_reference(batch["tokens"], batch["segment_ids"])
    np.testing.assert_array_equal(out["lm_weights"], weights)
    np.testing.assert_array_equal(out["lm_targets"][weights > 0], targets[weights > 0])
    # Every document boundary and every padding slot carries no loss.
    seg = batch["segment_ids"]
    boundary = seg[:, :-1] != seg[:, 1:]
    assert boundary.sum() > 100
    assert np.all(out["lm_weights"][:, :-1][boundary] == 0)
    assert np.all(out["lm_weights"][seg == 0] == 0)
    # One prediction per token of every document except its first.
    docs = sum(len(set(row[row != 0])) for row in seg)
    assert out["lm_weights"].sum() == (seg != 0).sum() - docs
    assert "prefix_mask" not in out  # plain causal attention


def test_prefix_lm_no_loss_inside_the_prefix():
    batch = packed_lm_batch(512, 64, seed=2, min_doc=4, max_doc=60)
    out = prepare(build("prefix_lm", prefix_fraction=0.5), batch)
    seg, prefix, w = batch["segment_ids"], out["prefix_mask"].astype(bool), out["lm_weights"]
    _, clm_w = clm_reference(batch["tokens"], seg)
    lengths = []
    for r in range(seg.shape[0]):
        first_doc = int(np.sum(seg[r] == seg[r, 0]))
        p = int(prefix[r].sum())
        lengths.append(p / first_doc)
        # A non-empty prefix from the row start, inside the first document, at most half of it.
        assert 1 <= p <= max(1, first_doc // 2), (r, p, first_doc)
        assert prefix[r, :p].all() and not prefix[r, p:].any()
        # No target inside the prefix; everything after it is ordinary causal LM.
        assert np.all(w[r, :p - 1] == 0)
        np.testing.assert_array_equal(w[r, p - 1:], clm_w[r, p - 1:])
    assert np.std(lengths) > 0.05  # the split point is random per row
    np.testing.assert_array_equal(out["lm_targets"][:, :-1], batch["tokens"][:, 1:])
    # Another step's key draws other prefixes.
    assert not np.array_equal(prepare(build("prefix_lm"), batch, seed=1)["prefix_mask"], prefix)


def test_sft_loss_only_on_response_tokens():
    batch = packed_lm_batch(64, 64, seed=3, min_doc=6)
    rng = np.random.RandomState(0)
    # Each document: prompt (loss_mask 0) then response (loss_mask 1).
    loss_mask = np.zeros_like(batch["tokens"])
    for r in range(64):
        for doc in set(batch["segment_ids"][r]) - {0}:
            idx = np.flatnonzero(batch["segment_ids"][r] == doc)
            loss_mask[r, idx[rng.randint(1, len(idx)) if len(idx) > 1 else 0:]] = 1
    out = prepare(build("sft"), {**batch, "loss_mask": loss_mask})
    _, clm_w = clm_reference(batch["tokens"], batch["segment_ids"])
    expected = clm_w.copy()
    expected[:, :-1] *= loss_mask[:, 1:]  # the *predicted* token must be a response token
    np.testing.assert_array_equal(out["lm_weights"], expected)


# ------------------------------------------------------------------ MLM


@pytest.fixture(scope="module")
def mlm_run():
    batch = packed_lm_batch(1024, 128, seed=4)
    return batch, prepare(build("mlm", "bert-tiny"), batch, seed=7)


def test_mlm_masks_15_percent_of_non_special_tokens(mlm_run):
    batch, out = mlm_run
    tokens, seg = batch["tokens"], batch["segment_ids"]
    chosen = out["mlm_weights"] > 0
    candidates = (tokens >= FIRST) & (seg != 0)
    assert candidates.sum() > 100_000
    # Special tokens (eos, [CLS], [SEP], [UNK]) and padding are never chosen.
    assert not np.any(chosen & ~candidates)
    assert np.any(~candidates & (seg != 0))  # there were special tokens to avoid
    rate = chosen.sum() / candidates.sum()
    assert abs(rate - 0.15) < 0.005, rate
    # The loss targets are the original tokens, and only chosen positions change.
    np.testing.assert_array_equal(out["mlm_targets"][chosen], tokens[chosen])
    np.testing.assert_array_equal(out["tokens"][~chosen], tokens[~chosen])


def test_mlm_80_10_10_split(mlm_run):
    batch, out = mlm_run
    chosen = out["mlm_weights"] > 0
    original, inputs = batch["tokens"][chosen], out["tokens"][chosen]
    n = chosen.sum()
    masked = inputs == SPECIAL.mask
    kept = inputs == original
    random = ~masked & ~kept
    # A random replacement equals the original with probability 1 / (number of normal ids).
    p_same = 1.0 / (VOCAB - FIRST)
    for frac, expected in ((masked.mean(), 0.8), (kept.mean(), 0.1 + 0.1 * p_same),
                           (random.mean(), 0.1 * (1 - p_same))):
        sigma = np.sqrt(expected * (1 - expected) / n)
        assert abs(frac - expected) < 5 * sigma, (frac, expected)
    # Random replacements are ordinary tokens spread over the vocabulary.
    assert inputs[random].min() >= FIRST and inputs[random].max() < VOCAB
    assert len(np.unique(inputs[random])) > 0.9 * (VOCAB - FIRST)


def test_mlm_masking_depends_on_the_step_key(mlm_run):
    batch, out = mlm_run
    obj = build("mlm", "bert-tiny")
    np.testing.assert_array_equal(prepare(obj, batch, seed=7)["mlm_weights"], out["mlm_weights"])
    other = prepare(obj, batch, seed=8)["mlm_weights"]
    assert (other != out["mlm_weights"]).mean() > 0.1


# ------------------------------------------------------------------ NSP


def nsp_batch(rows: int, la: int, lb: int, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    a = np.zeros((rows, la), np.int32)
    b = np.zeros((rows, lb), np.int32)
    for r in range(rows):
        n, m = rng.randint(1, la + 1), rng.randint(1, lb + 1)
        a[r, :n] = rng.randint(FIRST, VOCAB, n)
        b[r, :m] = rng.randint(FIRST, VOCAB, m)
    return {"tokens_a": a, "tokens_b": b}


def test_nsp_label_balance_and_pair_layout():
    rows, la, lb = 8192, 14, 15
    batch = nsp_batch(rows, la, lb)
    out = prepare(build("nsp", "bert-tiny"), batch, seed=3)
    labels = out["nsp_labels"]
    assert set(np.unique(labels)) == {0, 1}
    assert abs(labels.mean() - 0.5) < 5 * np.sqrt(0.25 / rows)
    assert out["tokens"].shape == (rows, la + lb + 3)
    all_b = {tuple(row[row != 0]) for row in batch["tokens_b"]}
    for r in range(0, rows, 7):
        a = batch["tokens_a"][r][batch["tokens_a"][r] != 0]
        true_b = batch["tokens_b"][r][batch["tokens_b"][r] != 0]
        tok = out["tokens"][r]
        # [CLS] A [SEP] B [SEP], then padding.
        assert tok[0] == SPECIAL.cls
        np.testing.assert_array_equal(tok[1:1 + len(a)], a)
        assert tok[1 + len(a)] == SPECIAL.sep
        rest = tok[2 + len(a):]
        end = int(np.flatnonzero(rest == SPECIAL.sep)[0])
        b = rest[:end]
        assert np.all(rest[end + 1:] == 0)
        if labels[r] == 0:  # IsNext: the true second segment
            np.testing.assert_array_equal(b, true_b)
        else:  # NotNext: another row's second segment
            assert tuple(b) in all_b and not np.array_equal(b, true_b)
        n_first, n_second = 2 + len(a), len(b) + 1
        total = n_first + n_second
        np.testing.assert_array_equal(out["token_types"][r],
                                      [0] * n_first + [1] * n_second + [0] * (len(tok) - total))
        np.testing.assert_array_equal(out["segment_ids"][r],
                                      [1] * total + [0] * (len(tok) - total))
        np.testing.assert_array_equal(out["positions"][r], np.arange(len(tok)))


def test_mlm_after_nsp_never_masks_cls_or_sep():
    batch = nsp_batch(2048, 30, 31, seed=5)
    out = prepare(build("mlm+nsp", "bert-tiny"), batch)
    chosen = out["mlm_weights"] > 0
    targets = out["mlm_targets"]
    assert not np.any(chosen & np.isin(targets, [SPECIAL.cls, SPECIAL.sep, 0]))
    candidates = (targets >= FIRST) & (out["segment_ids"] != 0)
    assert abs(chosen.sum() / candidates.sum() - 0.15) < 0.01
    assert set(out) >= {"nsp_labels", "token_types", "mlm_targets"}


# ------------------------------------------------------------------ span corruption


@pytest.fixture(scope="module")
def span_run():
    rows, length = 2048, 128
    rng = np.random.RandomState(6)
    tokens = rng.randint(FIRST, VOCAB, (rows, length)).astype(np.int32)
    lengths = np.where(rng.rand(rows) < 0.5, length, rng.randint(2, length + 1, rows))
    real = np.arange(length)[None] < lengths[:, None]
    tokens[~real] = 0
    batch = {"tokens": tokens, "segment_ids": real.astype(np.int32),
             "positions": np.where(real, np.arange(length)[None], 0).astype(np.int32)}
    obj = build("span_corruption", "t5-tiny")
    return batch, lengths, prepare(obj, batch, seed=11)


def parse_targets(targets: np.ndarray) -> list[tuple[int, list[int]]]:
    """[(sentinel id, span tokens), ...] from one target row: sentinel, tokens, ..., eos."""
    spans = []
    for t in targets:
        if t == SPECIAL.eos:
            return spans
        if SPECIAL.sentinel_start <= t < SPECIAL.num_special:
            spans.append((int(t), []))
        else:
            assert spans, "target must start with a sentinel"
            spans[-1][1].append(int(t))
    raise AssertionError("target row has no eos (truncated)")


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """Replace each sentinel of the inputs by the tokens after it in the targets."""
    spans = dict(parse_targets(targets))
    out = []
    for t in inputs:
        if t == SPECIAL.eos:
            return out
        out.extend(spans.pop(int(t)) if int(t) in spans else [int(t)])
    raise AssertionError("input row has no eos")


def test_span_corruption_reconstructs_the_original_exactly(span_run):
    batch, lengths, out = span_run
    for r in range(len(lengths)):
        original = batch["tokens"][r, :lengths[r]].tolist()
        assert reconstruct(out["tokens"][r], out["seq2seq_targets"][r]) == original, r
    # Static shapes: encoder input keeps the row length, targets a fixed length.
    assert out["tokens"].shape == batch["tokens"].shape
    assert out["seq2seq_targets"].shape[0] == len(lengths)


def test_span_corruption_noise_density_and_mean_span_length(span_run):
    batch, lengths, out = span_run
    noise_tokens, spans_per_row, span_lengths = [], [], []
    for r in range(len(lengths)):
        spans = parse_targets(out["seq2seq_targets"][r])
        # Sentinels numbered 0, 1, 2, ... in order, matching those in the inputs.
        ids = [s for s, _ in spans]
        assert ids == list(range(SPECIAL.sentinel_start, SPECIAL.sentinel_start + len(ids)))
        in_inputs = [t for t in out["tokens"][r] if SPECIAL.sentinel_start <= t < FIRST]
        assert in_inputs == ids
        assert all(len(tokens) > 0 for _, tokens in spans)
        noise_tokens.append(sum(len(t) for _, t in spans))
        spans_per_row.append(len(spans))
        span_lengths += [len(t) for _, t in spans]
    noise_tokens, spans_per_row = np.array(noise_tokens), np.array(spans_per_row)
    # T5: round(length * density) noise tokens in round(noise / mean_span_length) spans.
    np.testing.assert_array_equal(noise_tokens, np.clip(np.round(lengths * 0.15), 1, lengths - 1))
    density = noise_tokens.sum() / lengths.sum()
    assert abs(density - 0.15) < 0.005, density
    np.testing.assert_array_equal(spans_per_row, np.maximum(np.round(noise_tokens / 3.0), 1))
    mean_span = noise_tokens[lengths >= 20].sum() / spans_per_row[lengths >= 20].sum()
    assert abs(mean_span - 3.0) < 0.25, mean_span
    assert 1 < np.std(span_lengths) < 4  # span lengths vary around the mean


def test_span_corruption_decoder_inputs_are_shifted_targets(span_run):
    _, _, out = span_run
    targets = out["seq2seq_targets"]
    np.testing.assert_array_equal(out["decoder_tokens"][:, 0], 0)
    np.testing.assert_array_equal(out["decoder_tokens"][:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(out["seq2seq_weights"], (targets != 0).astype(np.float32))
    np.testing.assert_array_equal(out["segment_ids"], (out["tokens"] != 0).astype(np.int32))


# ------------------------------------------------------------------ loss formula


def _logsumexp(x):
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("z_loss,smoothing", [(0.0, 0.0), (1e-2, 0.0), (0.0, 0.1), (1e-3, 0.2)])
def test_cross_entropy_z_loss_and_label_smoothing(z_loss, smoothing):
    batch = packed_lm_batch(4, 24, seed=9)
    obj = build("clm", z_loss=z_loss, label_smoothing=smoothing)
    prepared = prepare(obj, batch)
    logits = np.random.RandomState(1).normal(0, 3, (4, 24, VOCAB))
    term = obj.loss({"logits": logits.astype(np.float32)}, prepared)["lm"]
    # Reference in float64: smoothed targets q = (1-e) onehot + e/V; loss = -sum q log p + z log(Z)^2.
    w, targets = prepared["lm_weights"], prepared["lm_targets"]
    log_p = logits - _logsumexp(logits)[..., None]
    q = np.full(logits.shape, smoothing / VOCAB)
    np.put_along_axis(q, targets[..., None], 1 - smoothing + smoothing / VOCAB, axis=-1)
    per_token = -(q * log_p).sum(-1) + z_loss * _logsumexp(logits) ** 2
    np.testing.assert_allclose(float(term.loss_sum), (per_token * w).sum(), rtol=2e-5)
    assert float(term.count) == w.sum()
    correct = (logits.argmax(-1) == targets) * w
    assert float(term.correct) == correct.sum()
