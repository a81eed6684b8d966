"""The objective registry, the Objective interface, and shared loss math.

An objective turns a host batch of token ids into model inputs, targets and
loss weights inside the jitted step (`prepare`, from a PRNG key derived from
the step), and model outputs into loss terms (`loss`). Terms are returned as
sums with their token counts so gradient accumulation can normalise by the
whole batch's count (see train/step.py).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError, ModelConfig, ObjectiveConfig
from llmjax.data.tokenizer import SpecialTokens

Array = jax.Array
Batch = dict[str, Array]

MODEL_INPUTS = ("tokens", "segment_ids", "positions", "token_types", "prefix_mask",
                "decoder_tokens", "decoder_segment_ids", "decoder_positions", "pool_index")

_REGISTRY: dict[str, type["Objective"]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make an objective available to configs by `name`."""
    def add(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return add


def registered() -> list[str]:
    return sorted(_REGISTRY)


class Term(NamedTuple):
    """One loss term of a batch: weighted sum, weight count, weighted correct count."""

    loss_sum: Array
    count: Array
    correct: Array


class Objective(abc.ABC):
    """Base class; subclasses set `architectures`, `batch_kind`, `order`, `terms` and
    implement prepare, counts and loss."""

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    batch_kind: ClassVar[str] = "lm"  # what the data pipeline must produce (llmjax.data)
    order: ClassVar[int] = 10  # composition order: row builders (nsp) before maskers (mlm)
    terms: tuple[str, ...] = ()  # names of the loss terms it returns
    term_weights: dict[str, float] = {}  # set by build(): objective.weights per term

    def __init__(self, cfg: ObjectiveConfig, model: ModelConfig, special: SpecialTokens):
        self.cfg, self.model, self.special = cfg, model, special
        self.check(model)

    def check(self, model: ModelConfig) -> None:
        """Raise ConfigError if the model cannot be trained with this objective."""
        if model.architecture not in self.architectures:
            raise ConfigError(
                f"objective {self.name!r} needs model.architecture in {list(self.architectures)}, "
                f"but model {model.family!r} is {model.architecture!r}; pick an objective among "
                f"{[n for n, c in sorted(_REGISTRY.items()) if model.architecture in c.architectures]}")

    @abc.abstractmethod
    def prepare(self, batch: Batch, rng: Array) -> Batch:
        """Add model inputs and targets to the batch (inside jit)."""

    @abc.abstractmethod
    def counts(self, batch: Batch) -> dict[str, Array]:
        """Weight count of each loss term, from the prepared batch alone."""

    @abc.abstractmethod
    def loss(self, outputs: dict[str, Array], batch: Batch) -> dict[str, Term]:
        """Loss terms (sums, counts, correct counts) from the model outputs."""


@dataclasses.dataclass(frozen=True)
class ChunkedLogits:
    """LM logits not computed yet: `head` maps hidden states [b, c, d] to float32 logits
    [b, c, vocab]; cross_entropy applies it `chunk` sequence positions at a time."""

    hidden: Array  # [b, t, d]
    head: Callable[[Array], Array]
    chunk: int


def cross_entropy(logits: Array | ChunkedLogits, targets: Array, weights: Array,
                  z_loss: float = 0.0, label_smoothing: float = 0.0) -> Term:
    """Softmax cross-entropy summed over weighted positions, with z-loss and label smoothing."""
    if isinstance(logits, ChunkedLogits):
        return _chunked_cross_entropy(logits, targets, weights, z_loss, label_smoothing)
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    target_logit = picked
    if label_smoothing:
        target_logit = ((1.0 - label_smoothing) * target_logit
                        + label_smoothing * jnp.mean(logits, axis=-1))
    loss = log_z - target_logit
    if z_loss:
        loss = loss + z_loss * jnp.square(log_z)
    weights = weights.astype(jnp.float32)
    # Top-1 hit: the target's logit is the row maximum (ties count as hits). Not argmax, a
    # max-and-index reduce that costs XLA:CPU another slow pass over the logits.
    correct = (picked >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return Term(jnp.sum(loss * weights), jnp.sum(weights), jnp.sum(correct * weights))


def _chunked_cross_entropy(logits: ChunkedLogits, targets: Array, weights: Array,
                           z_loss: float, label_smoothing: float) -> Term:
    """cross_entropy over sequence chunks: a scan whose rematerialised body computes one
    chunk's logits, so neither the forward nor the backward holds more than [b, chunk,
    vocab] of them (the head's forward runs twice). Chunks split the sequence, never the
    batch, so every device keeps its own rows."""
    @jax.checkpoint
    def body(total, xs):
        h, tg, w = xs
        term = cross_entropy(logits.head(h), tg, w, z_loss, label_smoothing)
        return jax.tree.map(jnp.add, total, term), None

    zero = Term(*(jnp.zeros((), jnp.float32) for _ in Term._fields))
    total, _ = jax.lax.scan(body, zero, sequence_chunks(logits, targets, weights))
    return total


def sequence_chunks(logits: ChunkedLogits, targets: Array, weights: Array):
    """(hidden, targets, weights) cut into [k, b, chunk, ...] sequence chunks for a scan over
    the head; the positions added to reach a multiple of the chunk carry weight 0."""
    hidden, c = logits.hidden, logits.chunk
    b, t = targets.shape
    pad = -t % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, weights))
    k = (t + pad) // c
    chunks = lambda x: jnp.moveaxis(x.reshape((b, k, c) + x.shape[2:]), 1, 0)  # noqa: E731
    return chunks(hidden), chunks(targets), chunks(weights)


def shift_left(x: Array, fill: int = 0) -> Array:
    """x[:, 1:] padded at the end: the next token of every position."""
    return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


def next_token_weights(segment_ids: Array) -> Array:
    """1 where position t+1 continues the document of t (no loss across packed documents)."""
    nxt = shift_left(segment_ids)
    return ((nxt == segment_ids) & (segment_ids != 0)).astype(jnp.float32)


class Composite(Objective):
    """Several objectives on one batch: prepared in `order`, losses weighted and summed."""

    def __init__(self, parts: list[Objective], weights: list[float]):
        self.parts = sorted(parts, key=lambda o: o.order)
        self.weights = {p.name: w for p, w in zip(parts, weights)}
        self.name = "+".join(p.name for p in parts)
        self.batch_kind = self.parts[0].batch_kind
        self.architectures = tuple(set.intersection(*(set(p.architectures) for p in parts)))

    def prepare(self, batch: Batch, rng: Array) -> Batch:
        for i, part in enumerate(self.parts):
            batch = part.prepare(batch, jax.random.fold_in(rng, i))
        return batch

    def counts(self, batch: Batch) -> dict[str, Array]:
        out = {}
        for part in self.parts:
            out.update(part.counts(batch))
        return out

    def loss(self, outputs: dict[str, Array], batch: Batch) -> dict[str, Term]:
        out = {}
        for part in self.parts:
            out.update(part.loss(outputs, batch))
        return out


def build(cfg: ObjectiveConfig, model: ModelConfig,
          special: SpecialTokens | None = None) -> Objective:
    """The objective (or composite) named by `objective.name`, checked against the model."""
    from llmjax import objectives as _  # noqa: F401  (registers the built-in objectives)
    special = special or SpecialTokens()
    names = [n.strip() for n in cfg.name.split("+") if n.strip()]
    if not names:
        raise ConfigError("objective.name is empty; choose one of " + ", ".join(registered()))
    parts = []
    for name in names:
        if name not in _REGISTRY:
            import difflib
            close = difflib.get_close_matches(name, registered(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown objective {name!r}{hint}; registered: {registered()}")
        parts.append(_REGISTRY[name](cfg, model, special))
    weights = [float(w) for w in cfg.weights] or [1.0] * len(parts)
    if len(parts) == 1:
        obj = parts[0]
        obj.term_weights = {t: weights[0] for t in obj.terms}
        return _with_router_loss(obj, model)
    kinds = {p.batch_kind for p in parts}
    if len(kinds - {"lm"}) > 1:
        raise ConfigError(f"objectives {names} need incompatible batches {sorted(kinds)}")
    comp = Composite(parts, weights)
    comp.term_weights = {t: w for p, w in zip(parts, weights) for t in p.terms}
    comp.terms = tuple(t for p in comp.parts for t in p.terms)
    return _with_router_loss(comp, model)


def _with_router_loss(obj: Objective, model: ModelConfig) -> Objective:
    """Mixture-of-experts models add the router balance and z-loss terms."""
    if not model.num_experts:
        return obj
    from llmjax.objectives.router import WithRouterLoss
    return WithRouterLoss(obj, model)
