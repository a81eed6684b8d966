"""Metric writers (JSONL, TensorBoard), FLOP counts and MFU.

FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B):
    6 * N + 12 * L * H * Q * T
N = non-embedding parameters (the matmuls; forward 2N, backward 4N), L layers,
H heads, Q head dim, T sequence length (the attention score and value
matmuls, forward + backward). Encoder-decoder models add cross-attention
against the encoder length. MFU = achieved FLOP/s / peak FLOP/s.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import jax

from llmjax.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, from vendor datasheets.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


def embedding_params(cfg: ModelConfig) -> int:
    n = cfg.vocab_size * cfg.d_model
    if cfg.position == "learned":
        n += cfg.max_len * cfg.d_model
    return n


def flops_per_token(cfg: ModelConfig, num_params: int, seq_len: int,
                    target_len: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward), formula in the module docstring."""
    dense = num_params - embedding_params(cfg)
    if cfg.tie_embeddings or cfg.mlm_head:  # the output projection is a matmul too
        dense += cfg.vocab_size * cfg.d_model
    attn_width = cfg.num_heads * cfg.dim_per_head
    layers = cfg.num_layers + (cfg.decoder_layers if cfg.architecture == "encoder_decoder" else 0)
    attention = 12 * layers * attn_width * seq_len
    if cfg.architecture == "encoder_decoder" and target_len:
        attention += 12 * cfg.decoder_layers * attn_width * seq_len  # cross-attention
    return 6.0 * dense + attention


def peak_flops(override: float = 0.0) -> Optional[float]:
    """Peak FLOP/s of all devices, or None when unknown (CPU without an override)."""
    devices = jax.devices()
    if override:
        return override * len(devices)
    kind = devices[0].device_kind
    for name, value in PEAK_FLOPS.items():
        if kind.startswith(name):
            return value * len(devices)
    return None


class MetricsWriter:
    """Appends metrics to run_dir/metrics.jsonl and TensorBoard event files (process 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **clean}) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
