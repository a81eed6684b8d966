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
import logging
import os
import time
from pathlib import Path
from typing import Optional

import jax

from llmjax import paths
from llmjax.config import ConfigError, ModelConfig
from llmjax.metrics_files import (METRICS_FILE, ChunkedRows, has_metrics, parse_rows, read_rows,
                                  trim_chunks)

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
    from llmjax.models.moe import inactive_params  # MoE: only the routed experts' FLOPs
    dense = num_params - embedding_params(cfg) - inactive_params(cfg)
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
    """Appends metrics to run_dir/metrics.jsonl and TensorBoard event files (process 0 only).

    Created with the step the run starts from (the resumed checkpoint's, 0 when fresh), it
    first drops the rows past that step, which a run killed after its last checkpoint (or
    before its first) wrote, so the files always match what a straight run writes. When
    rows were dropped, the TensorBoard events are rebuilt from the kept rows.
    NaN/inf values are written as they are (JSON NaN / Infinity): a diverged run shows it.

    A run_dir on object storage gets numbered chunk objects instead of one growing file
    (llmjax/metrics_files.py says why), and one TensorBoard event file per chunk.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True,
                 start_step: Optional[int] = None):
        self.enabled = jax.process_index() == 0
        self.remote = paths.is_remote(run_dir)
        root = paths.resolve(run_dir, "train.run_dir") if self.remote else Path(run_dir)
        self.path = root / METRICS_FILE
        self.tb_dir = root / "tensorboard"
        self.tb = None
        self.chunks: Optional[ChunkedRows] = None
        self.tensorboard = tensorboard
        if self.enabled and self.remote:
            if start_step is not None:
                for sequence, kept in list(trim_chunks(run_dir, start_step)):
                    self._chunk_events(sequence, kept)
            self.chunks = ChunkedRows(run_dir, on_chunk=self._chunk_events)
        elif self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            dropped = trim_metrics(self.path, start_step) if start_step is not None else 0
            if tensorboard:
                from tensorboardX import SummaryWriter
                # NaN is written on purpose (a diverged run shows it): no warning per value.
                logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
                stale = list(self.tb_dir.glob("events.out.tfevents.*"))
                if dropped and stale:
                    for path in stale:
                        path.unlink()
                self.tb = SummaryWriter(str(self.tb_dir))
                if dropped and stale:
                    for row in read_metrics(self.path):
                        self._tb_row(self.tb, row)

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        row = {"step": step, "split": prefix, "time": time.time(), **clean}
        if self.chunks is not None:
            self.chunks.append(row)
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as err:
            raise ConfigError(f"cannot append to {self.path}: {err.strerror or err}; free space "
                              f"or fix permissions, then rerun to resume from the last "
                              f"checkpoint") from None
        if self.tb is not None:
            self._tb_row(self.tb, row)
            self.tb.flush()

    @staticmethod
    def _tb_row(tb, row: dict) -> None:
        for key, value in row.items():
            if key not in ("step", "split", "time"):
                tb.add_scalar(f"{row['split']}/{key}", value, row["step"], walltime=row.get("time"))

    def _chunk_events(self, sequence: int, rows: list) -> None:
        """The TensorBoard event file of one metrics chunk on object storage: written locally
        (tensorboardX's own GCS writer re-uploads the whole file at every flush), then uploaded
        once; no rows = the chunk was deleted, and so is its event file."""
        target = self.tb_dir / f"events.out.tfevents.{sequence:012d}.llmjax"
        if not self.tensorboard:
            return
        if not rows:
            if target.exists():
                target.unlink()
            return
        import tempfile

        from tensorboardX import SummaryWriter
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory(prefix="llmjax-events-") as local:
            tb = SummaryWriter(local)
            for row in rows:
                self._tb_row(tb, row)
            tb.close()
            (event_file,) = Path(local).glob("events.out.tfevents.*")
            target.write_bytes(event_file.read_bytes())

    def flush(self) -> None:
        """Write buffered rows now (object storage; a local file is written per row)."""
        if self.chunks is not None:
            self.chunks.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl, or of its metrics/ chunks on object storage (a last
    line cut by a kill is skipped)."""
    text = os.fspath(path)
    if paths.is_remote(text) or not os.path.exists(text):
        parent = text.rsplit("/", 1)[0] if text.endswith("/" + METRICS_FILE) else None
        return read_rows(parent) if parent and has_metrics(parent) else []
    return parse_rows(Path(text).read_text())


def trim_metrics(path: Path, step: int) -> int:
    """Keep the rows of metrics.jsonl up to `step` (and drop a line cut by a kill); returns
    how many lines were dropped."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
