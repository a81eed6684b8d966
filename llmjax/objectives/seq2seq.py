"""Encoder-decoder objectives: T5 span corruption and supervised seq2seq.

Span corruption (Raffel et al. 2020): about `noise_density` of each row's
tokens, in spans of mean length `mean_span_length`, are dropped from the
encoder input (each span replaced by one sentinel) and become the decoder
target (sentinel, span tokens, ..., eos). All shapes are static, so it jits.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llmjax.objectives.base import Batch, Objective, Term, cross_entropy, register


def shift_right(targets, start_id: int = 0):
    """Decoder inputs: start token, then targets[:-1] (teacher forcing)."""
    return jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)


def _decoder_fields(targets) -> dict:
    real = (targets != 0).astype(jnp.int32)
    length = jnp.sum(real, axis=1, keepdims=True)
    idx = jnp.arange(targets.shape[1])[None]
    return {"decoder_tokens": shift_right(targets), "decoder_segment_ids": (idx < length).astype(
        jnp.int32), "decoder_positions": jnp.broadcast_to(idx, targets.shape).astype(jnp.int32),
            "seq2seq_targets": targets, "seq2seq_weights": real.astype(jnp.float32)}


class _Seq2Seq(Objective):
    architectures = ("encoder_decoder",)
    terms = ("seq2seq",)

    def counts(self, batch: Batch) -> dict:
        return {"seq2seq": jnp.sum(batch["seq2seq_weights"])}

    def loss(self, outputs, batch) -> dict[str, Term]:
        return {"seq2seq": cross_entropy(outputs["logits"], batch["seq2seq_targets"],
                                         batch["seq2seq_weights"], self.cfg.z_loss,
                                         self.cfg.label_smoothing)}


@register("seq2seq")
class Seq2Seq(_Seq2Seq):
    """Supervised inputs -> targets; loss on every real target token."""

    batch_kind = "seq2seq"

    def prepare(self, batch: Batch, rng) -> Batch:
        inputs = batch["inputs"]
        return {**batch, "tokens": inputs, "segment_ids": (inputs != 0).astype(jnp.int32),
                **_decoder_fields(batch["targets"])}


def _random_partition(rng, total, parts, size: int, max_parts: int):
    """Lengths of a uniformly random split of `total` items into `parts` non-empty runs.

    total, parts: [batch] ints; returns [batch, max_parts] (zeros past `parts`).
    """
    batch = total.shape[0]
    j = jnp.arange(size)[None]  # candidate cut points 1..total-1
    keys = jax.random.uniform(rng, (batch, size))
    keys = jnp.where((j >= 1) & (j < total[:, None]), keys, 2.0)
    rank = jnp.argsort(jnp.argsort(keys, axis=1), axis=1)
    cut = rank < (parts[:, None] - 1)
    run = jnp.cumsum(cut, axis=1)  # run index of item j
    valid = j < total[:, None]
    one_hot = jax.nn.one_hot(jnp.where(valid, run, max_parts), max_parts, dtype=jnp.int32)
    return jnp.sum(one_hot, axis=1)


@register("span_corruption")
class SpanCorruption(_Seq2Seq):
    """T5 pretraining on rows of token ids (`tokens`, `segment_ids`)."""

    def target_length(self, length: int) -> int:
        """Longest possible target for rows of `length`: noise + one sentinel per span + eos."""
        if self.cfg.target_length:
            return self.cfg.target_length
        noise = round(length * self.cfg.noise_density)
        return noise + max(round(noise / self.cfg.mean_span_length), 1) + 2

    def noise_mask(self, rng, real_lengths, length: int):
        """[batch, length] bool: noise positions, spans interleaved with kept runs."""
        density, mean = self.cfg.noise_density, self.cfg.mean_span_length
        n = real_lengths.astype(jnp.float32)
        noise = jnp.clip(jnp.round(n * density), 1, jnp.maximum(n - 1, 1)).astype(jnp.int32)
        spans = jnp.clip(jnp.round(noise / mean), 1, None).astype(jnp.int32)
        spans = jnp.minimum(spans, jnp.minimum(noise, jnp.maximum(real_lengths - noise, 1)))
        spans = jnp.minimum(spans, self.special.num_sentinels)
        max_spans = max(1, min(length // 2, self.special.num_sentinels))
        k1, k2 = jax.random.split(rng)
        noise_runs = _random_partition(k1, noise, spans, length, max_spans)
        keep_runs = _random_partition(k2, real_lengths - noise, spans, length, max_spans)
        runs = jnp.stack([keep_runs, noise_runs], axis=2).reshape(noise.shape[0], 2 * max_spans)
        ends = jnp.cumsum(runs, axis=1)
        idx = jnp.arange(length)
        run_of = jax.vmap(lambda e: jnp.searchsorted(e, idx, side="right"))(ends)
        is_noise = (run_of % 2 == 1) & (idx[None] < real_lengths[:, None])
        return is_noise, run_of // 2

    def prepare(self, batch: Batch, rng) -> Batch:
        tokens = batch["tokens"]
        b, length = tokens.shape
        real = batch["segment_ids"] != 0
        # Rows are left-aligned: drop the pipeline's eos/padding at the end from the count.
        real_len = jnp.sum(real, axis=1)
        is_noise, span = self.noise_mask(rng, real_len, length)
        prev_noise = jnp.concatenate([jnp.zeros((b, 1), bool), is_noise[:, :-1]], axis=1)
        span_start = is_noise & ~prev_noise
        sentinels = self.special.sentinel_start + span
        eos = self.special.eos

        def compact(values, keep, out_len):
            dest = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, out_len)
            out = jnp.zeros((b, out_len), tokens.dtype)
            out = out.at[jnp.arange(b)[:, None], dest].set(values, mode="drop")
            count = jnp.sum(keep, axis=1)
            return out.at[jnp.arange(b), count].set(eos, mode="drop")

        inputs_keep = real & (~is_noise | span_start)
        inputs = compact(jnp.where(span_start, sentinels, tokens), inputs_keep, length)
        t_len = self.target_length(length)
        # Targets: per span, its sentinel then its tokens. Interleave by doubling positions.
        doubled_vals = jnp.stack([sentinels, tokens], axis=2).reshape(b, 2 * length)
        doubled_keep = jnp.stack([span_start, is_noise], axis=2).reshape(b, 2 * length)
        targets = compact(doubled_vals, doubled_keep, t_len)
        return {**batch, "tokens": inputs, "segment_ids": (inputs != 0).astype(jnp.int32),
                "positions": jnp.broadcast_to(jnp.arange(length), (b, length)).astype(jnp.int32),
                **_decoder_fields(targets)}
