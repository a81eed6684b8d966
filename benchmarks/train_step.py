"""Train-step throughput of the reference GPT: tokens/s, achieved FLOP/s, fraction of peak.

    python benchmarks/train_step.py [--steps 8] [--kernels auto xla] [--dtypes float32 bfloat16]
                                    [--logits-chunks 0 64]

Reference GPT (issue 3): 6 layers, d_model 384, 6 heads, d_ff 1536, seq 256, batch 8,
vocab 8192, tied head; fwd + bwd + AdamW on one device. The matmul peak is measured in the
same run (a large XLA dot, f32 and bf16 x bf16 -> f32); FLOPs per step are
benchmarks/common.py:train_flops (6 x matmul params x tokens + attention). Variants run
alternately, one step each per round; medians after one warm-up round.
"""
from __future__ import annotations

import argparse

from common import (REFERENCE, JaxRunner, jax_batch, jnp, matmul_peak, median, reference_config,
                    synthetic_tokens, table, train_flops)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kernels", nargs="+", default=["auto", "xla"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--logits-chunks", nargs="+", type=int, default=[0],
                    help="train.logits_chunk values (0: whole logits)")
    args = ap.parse_args()
    runners, compile_s = {}, {}
    batches = [jax_batch(synthetic_tokens(i)) for i in range(args.steps + 1)]
    for dtype in args.dtypes:
        for kernels in args.kernels:
            for chunk in args.logits_chunks:
                cfg = reference_config(dtype, kernels=kernels)
                cfg.train.logits_chunk = chunk
                r = JaxRunner(cfg)
                compile_s[(dtype, kernels, chunk)] = r.compile(batches[0])[0]
                runners[(dtype, kernels, chunk)] = r
    times = {k: [] for k in runners}
    for i in range(1, args.steps + 1):
        for k, r in runners.items():
            times[k].append(r.step(batches[i])[0])
    peaks = {"float32": matmul_peak(jnp.float32), "bfloat16": matmul_peak(jnp.bfloat16)}
    flops = train_flops()
    tokens = REFERENCE["batch"] * REFERENCE["seq"]
    rows = []
    for (dtype, kernels, chunk), ts in times.items():
        t = median(ts[1:] if len(ts) > 2 else ts)
        rows.append([dtype, kernels, chunk, f"{compile_s[(dtype, kernels, chunk)]:.1f}",
                     f"{t * 1e3:.0f}",
                     f"{tokens / t:,.0f}", f"{flops / t / 1e9:.1f}",
                     f"{flops / t / peaks[dtype]:.0%}"])
    print(f"reference GPT {REFERENCE}: {flops / 1e9:.1f} GFLOP/step; matmul peak this run "
          f"f32 {peaks['float32'] / 1e9:.0f}, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
    print(table(["dtype", "model.kernels", "logits_chunk", "compile+1st s", "step ms", "tokens/s", "GFLOP/s",
                 "of matmul peak"], rows))


if __name__ == "__main__":
    main()
