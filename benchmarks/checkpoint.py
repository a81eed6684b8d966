"""Checkpoint save/restore time and size for the reference GPT (6L, d384, 6H, V 8192, max_len 256).

    python benchmarks/checkpoint.py [--devices 8] [--repeats 3]

Reports: blocking part of an async save (until training may continue), total save time
(until committed), restore time onto the same mesh and onto one device, bytes on disk.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from llmjax import config
    from llmjax.checkpoint import TrainCheckpoints
    from llmjax.models import param_count
    from llmjax.train.experiment import build
    from llmjax.train.resume import restore_state

    overrides = ["model.num_layers=6", "model.d_model=384", "model.num_heads=6", "model.d_ff=1536",
                 "model.vocab_size=8192", "model.max_len=256", "train.seq_len=256",
                 "train.compilation_cache=", "checkpoint.keep=2"]
    root = Path(tempfile.mkdtemp(prefix="llmjax-ckpt-bench-"))
    try:
        cfg = config.load(Path(__file__).resolve().parents[1] / "configs/experiments/gpt-tiny.yaml",
                          overrides + [f"train.run_dir={root}"])
        exp = build(cfg)
        state = exp.init_state()
        n = param_count(state.params)
        ckpt = TrainCheckpoints(root, cfg)
        blocking, total = [], []
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            ckpt.save(i + 1, state, {"dummy": i}, exp.mesh)
            t_block = time.perf_counter() - start
            ckpt.wait()
            t_total = time.perf_counter() - start
            if i:  # the first save pays one-off setup
                blocking.append(t_block)
                total.append(t_total)
        step = ckpt.latest_step()
        size = sum(p.stat().st_size for p in (root / "checkpoints" / str(step)).rglob("*")
                   if p.is_file())
        restore_same, restore_one = [], []
        one = build(config.load(Path(__file__).resolve().parents[1] /
                                "configs/experiments/gpt-tiny.yaml",
                                overrides + [f"train.run_dir={root}", "mesh.data=1"]),
                    jax.devices()[:1])
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            restored, _, _ = restore_state(ckpt, step, exp)
            jax.block_until_ready(restored)
            t = time.perf_counter() - start
            start = time.perf_counter()
            restored, _, _ = restore_state(ckpt, step, one)
            jax.block_until_ready(restored)
            if i:
                restore_same.append(t)
                restore_one.append(time.perf_counter() - start)
        ckpt.close()
        med = statistics.median
        print(f"reference GPT: {n:,} params (+ AdamW moments), mesh {dict(exp.mesh.shape)}")
        print(f"checkpoint size: {size / 2**20:.1f} MiB")
        print(f"save: blocking {med(blocking):.2f} s, until committed {med(total):.2f} s")
        print(f"restore: same mesh {med(restore_same):.2f} s, one device {med(restore_one):.2f} s")
        print(f"(median of {args.repeats}; {jax.device_count()} {jax.devices()[0].platform} devices)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
