"""Log-likelihood of (context, continuation) requests, packed into rows and scored in one
jitted pass per batch.

Each request becomes one segment of a row: its tokens minus the last are the input, the
same tokens shifted by one are the targets, and only the continuation's targets count.
Segments restart positions and never attend across each other, so a request scores the same
alone or packed beside others (bit for bit: the masked keys contribute exact zeros). With a
mesh, rows shard over data*fsdp and the model by its logical axes, as in training.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llmjax.config import ConfigError, ModelConfig
from llmjax.generate import check_token_ids, shard_params
from llmjax.models.transformer import Transformer
from llmjax.parallel import BATCH_AXES, DEFAULT_RULES

Params = dict


@dataclasses.dataclass(frozen=True)
class Score:
    """Sum of the continuation's token log-probabilities, and whether greedy decoding from
    the context would have produced exactly the continuation."""

    logprob: float
    is_greedy: bool


def check_request(context: Sequence[int], continuation: Sequence[int], max_len: int,
                  vocab_size: int, index: int) -> tuple[list[int], list[int]]:
    """The request as id lists; ConfigError for one that cannot be scored."""
    if len(continuation) == 0:
        raise ConfigError(f"request {index}: empty continuation; there is nothing to score")
    if len(context) == 0:
        raise ConfigError(f"request {index}: empty context; the first continuation token needs "
                          f"at least one token before it (pass the BOS/EOS id as context)")
    if len(continuation) > max_len:
        raise ConfigError(f"request {index}: continuation of {len(continuation)} tokens is "
                          f"longer than the context window ({max_len} tokens); shorten it or "
                          f"load the model with a larger max_len")
    ctx = check_token_ids(list(context), vocab_size, f"request {index} context").tolist()
    cont = check_token_ids(list(continuation), vocab_size,
                           f"request {index} continuation").tolist()
    return ctx, cont


def _segment(context: list[int], continuation: list[int], max_len: int):
    """Input ids, target ids and the number of scored (continuation) targets, the context
    cut from the left so that the input fits max_len."""
    full = (context + continuation)[-(max_len + 1):]
    return full[:-1], full[1:], len(continuation)


def pack(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Request indices per row: first-fit by decreasing length (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


class Scorer:
    """Scores requests against one model; the jitted pass is compiled once per row shape.

    `row_len` (default model.max_len) is the packed row length; `batch_rows` rows go through
    the model per call (rounded up to a multiple of the mesh's data*fsdp).
    """

    def __init__(self, cfg: ModelConfig, params: Params, mesh: Optional[Mesh] = None,
                 rules: Sequence = DEFAULT_RULES, row_len: Optional[int] = None,
                 batch_rows: int = 8):
        if cfg.architecture != "decoder":
            raise ConfigError(f"log-likelihood scoring needs a decoder-only model; this one is "
                              f"{cfg.architecture!r} ({cfg.family})")
        self.cfg = dataclasses.replace(cfg, dropout=0.0)
        self._params_cfg = cfg
        self.mesh, self.rules = mesh, tuple(rules)
        self.row_len = min(row_len or cfg.max_len, cfg.max_len)
        n = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
        self.batch_rows = -(-batch_rows // n) * n
        self.set_params(params)
        model = Transformer(self.cfg)

        def token_scores(params, tokens, targets, segments, positions):
            logits = model.apply({"params": params}, tokens, segment_ids=segments,
                                 positions=positions)["logits"].astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(logits, axis=-1) == targets

        kwargs = {}
        self._rows = None
        if mesh is not None:
            # Every process passes the same whole batch (global arrays built from it) and
            # gets the whole result back (replicated output: readable on every host).
            self._rows = rows = NamedSharding(mesh, jax.P(BATCH_AXES))
            whole = NamedSharding(mesh, jax.P())
            kwargs = dict(in_shardings=(None, rows, rows, rows, rows),
                          out_shardings=(whole, whole))
        self._scores = jax.jit(token_scores, **kwargs)

    def set_params(self, params: Params) -> None:
        """Score with `params` (same config) from now on: no recompile."""
        self.params = (shard_params(self._params_cfg, params, self.mesh, self.rules)
                       if self.mesh is not None else params)

    def _context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      packed: bool = True) -> list[Score]:
        """One Score per (context ids, continuation ids) request, in order. packed=False
        puts every request in a row of its own (the reference packing is checked against)."""
        segs = []
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = check_request(ctx, cont, self.row_len, self.cfg.vocab_size, i)
            segs.append(_segment(ctx, cont, self.row_len))
        lengths = [len(s[0]) for s in segs]
        rows = pack(lengths, self.row_len) if packed else [[i] for i in range(len(segs))]
        results: list[Optional[Score]] = [None] * len(segs)
        for start in range(0, len(rows), self.batch_rows):
            batch = rows[start:start + self.batch_rows]
            arrays, spans = self._batch(batch, segs)
            if self._rows is not None:
                arrays = tuple(jax.make_array_from_callback(a.shape, self._rows,
                                                            lambda index, a=a: a[index])
                               for a in arrays)
            with self._context():
                logp, greedy = self._scores(self.params, *arrays)
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for i, (r, lo, hi) in spans.items():
                # float64 sum in token order: the same value however the request was packed
                results[i] = Score(float(np.sum(logp[r, lo:hi], dtype=np.float64)),
                                   bool(greedy[r, lo:hi].all()))
        return results  # type: ignore[return-value]

    def _batch(self, batch: list[list[int]], segs: list) -> tuple[tuple, dict]:
        shape = (self.batch_rows, self.row_len)
        tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        segments, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        spans = {}
        for r, members in enumerate(batch):
            at = 0
            for k, i in enumerate(members, start=1):
                inp, tgt, scored = segs[i]
                n = len(inp)
                tokens[r, at:at + n], targets[r, at:at + n] = inp, tgt
                segments[r, at:at + n], positions[r, at:at + n] = k, np.arange(n)
                spans[i] = (r, at + n - scored, at + n)
                at += n
        return (tokens, targets, segments, positions), spans

    def loglikelihood_rolling(self, documents: Sequence[Sequence[int]], prefix_id: int,
                              stride: Optional[int] = None) -> list[float]:
        """Log-likelihood of every token of each document (perplexity), scored in windows of
        at most row_len tokens: each window predicts the next `stride` tokens (default
        row_len: disjoint windows, as lm-evaluation-harness does) with the tokens before them
        as context, so a smaller stride gives every prediction more context. The first token
        is predicted from `prefix_id` (BOS or EOS)."""
        stride = stride or self.row_len
        if not 1 <= stride <= self.row_len:
            raise ConfigError(f"stride={stride}: must be in [1, row_len={self.row_len}]")
        requests, owner = [], []
        for d, doc in enumerate(documents):
            doc = list(doc)
            if not doc:
                raise ConfigError(f"document {d} is empty; there is nothing to score")
            for request in rolling_windows(doc, prefix_id, self.row_len, stride):
                requests.append(request)
                owner.append(d)
        totals = [0.0] * len(documents)
        for d, score in zip(owner, self.loglikelihood(requests)):
            totals[d] += score.logprob
        return totals


def rolling_windows(doc: list[int], prefix_id: int, window: int,
                    stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests whose continuations tile `doc` exactly; each input
    (context + continuation minus its last token) is at most `window` tokens."""
    out = []
    padded = [prefix_id] + doc
    for start in range(0, len(doc), stride):
        end = min(start + stride, len(doc))
        ctx_from = max(0, end - window)  # in padded coordinates, the input ends at padded[end-1]
        out.append((padded[ctx_from:start + 1], doc[start:end]))
    return out
