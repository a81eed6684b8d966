"""Shared pieces of the benchmarks: the reference GPT, synthetic batches, FLOPs, matmul peak.

Reference GPT (issues 3 and 8): 6 layers, d_model 384, 6 heads, d_ff 1536, seq 256,
batch 8, vocab 8192, tied head, learned positions, pre-LN, GELU (tanh), biases,
AdamW (b1 0.9, b2 0.95, wd 0.1 on matrices and embeddings), global-norm clip 1.0.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REFERENCE = dict(layers=6, d_model=384, heads=6, d_ff=1536, seq=256, batch=8, vocab=8192)


def reference_config(dtype: str = "float32", kernels: str = "auto", layers: int | None = None,
                     remat: str = "none", lr: float = 1e-3, scan: bool = True, **model):
    """The llmjax Config of the reference GPT (one device, constant learning rate)."""
    from llmjax.config import from_dict
    r = REFERENCE
    return from_dict({
        "model": {"preset": "gpt-tiny", "vocab_size": r["vocab"], "d_model": r["d_model"],
                  "num_layers": layers or r["layers"], "num_heads": r["heads"],
                  "d_ff": r["d_ff"], "max_len": r["seq"], "dtype": dtype,
                  "param_dtype": "float32", "kernels": kernels, "remat": remat,
                  "scan_layers": scan, **model},
        "objective": {"name": "clm"},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "train": {"batch_size": r["batch"], "seq_len": r["seq"], "steps": 1000},
        "optimizer": {"name": "adamw", "learning_rate": lr, "schedule": "constant",
                      "warmup_steps": 0, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
                      "weight_decay": 0.1, "grad_clip": 1.0},
    })


def synthetic_tokens(step: int, batch: int = REFERENCE["batch"], seq: int = REFERENCE["seq"],
                     vocab: int = REFERENCE["vocab"]) -> np.ndarray:
    """Deterministic token ids with learnable structure (a noisy repeating pattern)."""
    rng = np.random.default_rng(step)
    period = 17
    base = (np.arange(seq)[None, :] * 7 + np.arange(batch)[:, None] * 131) % period
    noise = rng.integers(0, vocab, size=(batch, seq))
    keep = rng.random((batch, seq)) < 0.8
    return np.where(keep, 10 + base * 37, noise).astype(np.int32)


def jax_batch(tokens: np.ndarray) -> dict:
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones(tokens.shape, jnp.int32)}


def train_flops(layers=REFERENCE["layers"], d=REFERENCE["d_model"], d_ff=REFERENCE["d_ff"],
                seq=REFERENCE["seq"], batch=REFERENCE["batch"], vocab=REFERENCE["vocab"]) -> float:
    """Matmul FLOPs of one fwd+bwd step: 6 * (matmul params) * tokens + attention.

    Matmul params per layer 4 d^2 (q, k, v, out) + 2 d d_ff (MLP), plus the tied LM head
    V d (the embedding lookup is a gather, not counted). Attention: QK^T and PV are
    2 * 2 * seq^2 * d per sequence and layer forward, x3 with the backward; no causal
    discount (both frameworks compute the full score matrix)."""
    tokens = seq * batch
    params = layers * (4 * d * d + 2 * d * d_ff) + vocab * d
    return 6.0 * params * tokens + 12.0 * layers * seq * seq * d * batch


def matmul_peak(dtype=jnp.float32, m: int = 2048, k: int = 1536, n: int = 1536,
                reps: int = 8) -> float:
    """Best achieved FLOP/s of one large [m,k]@[k,n] XLA dot (f32 accumulation), this run."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best


def median(xs) -> float:
    return statistics.median(xs)


def table(headers, rows) -> str:
    """A GitHub-markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


class JaxRunner:
    """A compiled llmjax train step on the reference model (state donated step to step)."""

    def __init__(self, config, seed_params=None):
        from llmjax.train.experiment import build
        self.exp = build(config, devices=jax.devices()[:1])
        self.state = self.exp.init_state()
        if seed_params is not None:
            self.state = self.state.replace(
                params=jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), self.state.params,
                                    seed_params))
        self.step_fn = self.exp.train_step(["tokens", "segment_ids"])

    def compile(self, batch) -> tuple[float, float]:
        """(seconds for compile + first step, loss of the first step)."""
        t = time.perf_counter()
        self.state, m = self.step_fn(self.state, batch)
        loss = float(m["loss"])
        return time.perf_counter() - t, loss

    def step(self, batch) -> tuple[float, float]:
        t = time.perf_counter()
        self.state, m = self.step_fn(self.state, batch)
        loss = float(m["loss"])
        return time.perf_counter() - t, loss
