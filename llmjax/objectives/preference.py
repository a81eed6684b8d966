"""Preference objectives on (prompt, chosen, rejected) pairs: DPO, and ORPO / SimPO.

The host batch (batch kind "preference", llmjax/data/preference.py) holds per pair
`chosen`, `rejected` [B, T] token ids and `chosen_mask`, `rejected_mask` [B, T] with
0 = padding, 1 = prompt, 2 = completion. `prepare` stacks both sides into ONE model
batch [2B, T]: chosen rows first, then rejected rows. That order survives gradient
accumulation (micro-batch i takes rows i, i+k, ...; B is a multiple of k, so pair p's
chosen row p and rejected row B+p land in the same micro-batch, in the same order).

A side's score is the summed log-probability of its completion tokens given the prompt.
DPO (Rafailov et al. 2023) compares policy and reference:

    reward_side = beta * (log pi(side) - log ref(side))
    loss = -(1 - eps) log sigmoid(r_c - r_r) - eps log sigmoid(r_r - r_c)

(eps: label smoothing, the "conservative DPO" of Mitchell 2023). The reference outputs
arrive as outputs["reference"] (train/step.py runs the reference forward when an
objective sets `needs_reference`; llmjax/peft/reference.py says what the reference is), or,
with objective.reference=cached, as the batch's float fields `ref_chosen`, `ref_rejected`
[B] (the scores under the initial parameters, computed once before training:
llmjax/train/reference_cache.py).
ORPO (Hong et al. 2024) and SimPO (Meng et al. 2024) need no reference: they score a side
by its mean token log-probability.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError, ModelConfig
from llmjax.objectives.base import (Batch, ChunkedLogits, Objective, Term, next_token_weights,
                                    register, sequence_chunks, shift_left)

PROMPT, COMPLETION = 1, 2  # values of chosen_mask / rejected_mask (0: padding)
CACHED = ("ref_chosen", "ref_rejected")  # batch fields of objective.reference=cached
REPORTS = ("reward_chosen", "reward_rejected", "reward_margin")


def token_logprobs(logits, targets):
    """log p(target) at every position, float32 [b, t]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(logits, targets, weights):
    """sum over positions of weight * log p(target): one score per row, float32 [b].

    With ChunkedLogits the head runs `chunk` positions at a time in a rematerialised scan,
    as cross_entropy does, so no more than [b, chunk, vocab] logits exist at once."""
    weights = weights.astype(jnp.float32)
    if not isinstance(logits, ChunkedLogits):
        return jnp.sum(token_logprobs(logits, targets) * weights, axis=-1)
    @jax.checkpoint
    def body(total, xs):
        h, tg, w = xs
        return total + jnp.sum(token_logprobs(logits.head(h), tg) * w, axis=-1), None

    total, _ = jax.lax.scan(body, jnp.zeros((targets.shape[0],), jnp.float32),
                            sequence_chunks(logits, targets, weights))
    return total


def smoothed_logsigmoid_loss(z, smoothing: float):
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    loss = -jax.nn.log_sigmoid(z)
    if smoothing:
        loss = (1.0 - smoothing) * loss - smoothing * jax.nn.log_sigmoid(-z)
    return loss


class _Preference(Objective):
    """Shared pair handling: stack, score both sides, report rewards."""

    architectures = ("decoder",)
    batch_kind = "preference"
    needs_reference = False
    reports = REPORTS  # per-pair means logged beside the loss (not part of it)

    def __init__(self, cfg, model: ModelConfig, special):
        super().__init__(cfg, model, special)
        self.terms = (self.name,)

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if self.cfg.beta <= 0:
            raise ConfigError(f"objective.beta={self.cfg.beta} must be > 0 for {self.name!r}")

    def prepare(self, batch: Batch, rng) -> Batch:
        tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        segment_ids = (mask > 0).astype(jnp.int32)
        positions = jnp.where(segment_ids > 0, jnp.arange(tokens.shape[1])[None, :], 0)
        weights = next_token_weights(segment_ids) * shift_left(
            (mask == COMPLETION).astype(jnp.float32))
        n = batch["chosen"].shape[0]
        has = jnp.sum(weights, axis=-1) > 0
        return {**batch, "tokens": tokens, "segment_ids": segment_ids,
                "positions": positions.astype(jnp.int32), "pref_targets": shift_left(tokens),
                "pref_weights": weights, "pair_valid": (has[:n] & has[n:]).astype(jnp.float32)}

    def counts(self, batch: Batch) -> dict:
        count = jnp.sum(batch["pair_valid"])
        return {self.name: count, **{name: count for name in self.reports}}

    def _scores(self, logits, batch: Batch):
        """(chosen, rejected) summed completion log-probs and completion lengths, [n] each."""
        logp = sequence_logprobs(logits, batch["pref_targets"], batch["pref_weights"])
        lengths = jnp.sum(batch["pref_weights"], axis=-1)
        n = logp.shape[0] // 2
        return logp[:n], logp[n:], lengths[:n], lengths[n:]

    def _terms(self, loss, reward_c, reward_r, extra_loss, batch: Batch) -> dict[str, Term]:
        valid = batch["pair_valid"]
        count = jnp.sum(valid)
        zero = jnp.zeros((), jnp.float32)
        margin = reward_c - reward_r
        out = {self.name: Term(jnp.sum((loss + extra_loss) * valid), count,
                               jnp.sum((margin > 0) * valid))}
        for name, value in zip(self.reports, (reward_c, reward_r, margin)):
            out[name] = Term(jnp.sum(jax.lax.stop_gradient(value) * valid), count, zero)
        return out


@register("dpo")
class DPO(_Preference):
    """Direct preference optimisation against a reference model."""

    def __init__(self, cfg, model: ModelConfig, special):
        super().__init__(cfg, model, special)
        # cached: the reference scores come with the batch; no reference forward in the step
        self.cached_reference = cfg.reference == "cached"
        self.needs_reference = not self.cached_reference

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if not 0.0 <= self.cfg.dpo_label_smoothing < 0.5:
            raise ConfigError(f"objective.dpo_label_smoothing={self.cfg.dpo_label_smoothing} "
                              "must be in [0, 0.5)")

    def reference_scores(self, outputs, batch: Batch):
        """(chosen, rejected) summed completion log-probs of a prepared batch's outputs [B]."""
        pc, pr, _, _ = self._scores(outputs["logits"], batch)
        return pc, pr

    def loss(self, outputs, batch) -> dict[str, Term]:
        pc, pr, _, _ = self._scores(outputs["logits"], batch)
        if self.cached_reference:
            if not all(k in batch for k in CACHED):
                raise ValueError("objective.reference=cached needs the batch fields "
                                 f"{CACHED} (llmjax/train/reference_cache.py attaches them)")
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        elif "reference" in outputs:
            rc, rr, _, _ = self._scores(outputs["reference"]["logits"], batch)
        else:
            raise ValueError("objective 'dpo' needs the reference outputs (train/step.py runs "
                             "the reference forward when objective.needs_reference)")
        beta = self.cfg.beta
        reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
        loss = smoothed_logsigmoid_loss(reward_c - reward_r, self.cfg.dpo_label_smoothing)
        return self._terms(loss, reward_c, reward_r, 0.0, batch)


@register("simpo")
class SimPO(_Preference):
    """SimPO: length-normalised log-probs as the implicit reward, a target margin gamma,
    no reference model."""

    def loss(self, outputs, batch) -> dict[str, Term]:
        pc, pr, lc, lr = self._scores(outputs["logits"], batch)
        beta = self.cfg.beta
        reward_c, reward_r = beta * pc / jnp.maximum(lc, 1), beta * pr / jnp.maximum(lr, 1)
        loss = smoothed_logsigmoid_loss(reward_c - reward_r - self.cfg.simpo_gamma,
                                        self.cfg.dpo_label_smoothing)
        return self._terms(loss, reward_c, reward_r, 0.0, batch)


@register("orpo")
class ORPO(_Preference):
    """ORPO: chosen-side NLL plus beta * -log sigmoid(log odds ratio), no reference model
    (objective.beta is ORPO's lambda, as in TRL)."""

    def loss(self, outputs, batch) -> dict[str, Term]:
        pc, pr, lc, lr = self._scores(outputs["logits"], batch)
        mean_c, mean_r = pc / jnp.maximum(lc, 1), pr / jnp.maximum(lr, 1)

        def log_odds(mean_logp):  # log(p / (1 - p)) of the mean token probability
            mean_logp = jnp.minimum(mean_logp, -1e-6)  # p = 1 exactly: finite odds
            return mean_logp - jnp.log(-jnp.expm1(mean_logp))

        ratio = smoothed_logsigmoid_loss(log_odds(mean_c) - log_odds(mean_r), 0.0)
        beta = self.cfg.beta
        return self._terms(beta * ratio, beta * mean_c, beta * mean_r, -mean_c, batch)
