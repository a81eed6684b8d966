"""Compile time of the train step vs depth: layers under nn.scan (and unrolled, for contrast).

    python benchmarks/compile_time.py [--layers 2 24] [--unrolled] [--repeats 1]

Each measurement is lower + compile (XLA) of the full train step (fwd + bwd + AdamW) of the
reference GPT width (d 384, 6 heads, seq 256, batch 8, vocab 8192), in a fresh jit, without
the persistent cache. Goal (issue 8): 24 layers under scan <= 1.3x the time of 2 layers.
Also shows the persistent compilation cache (llmjax.compile_cache) on a second compile.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from common import jax, jax_batch, median, reference_config, synthetic_tokens, table


def compile_seconds(layers: int, scan: bool, kernels: str = "auto") -> tuple[float, float]:
    from llmjax.train.experiment import build
    exp = build(reference_config(kernels=kernels, layers=layers, scan=scan),
                devices=jax.devices()[:1])
    abstract = exp.abstract_state()
    step = exp.train_step(["tokens", "segment_ids"])
    batch = jax_batch(synthetic_tokens(0))
    t = time.perf_counter()
    lowered = step.lower(abstract, batch)
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    lowered.compile()
    return t_lower, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 24])
    ap.add_argument("--unrolled", action="store_true", help="also compile unrolled stacks")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    rows, results = [], {}
    modes = [True, False] if args.unrolled else [True]
    for _ in range(args.repeats):  # alternate depths so drift hits all alike
        for scan in modes:
            for n in args.layers:
                results.setdefault((scan, n), []).append(compile_seconds(n, scan))
                print(f"scan={scan} layers={n}: lower {results[(scan, n)][-1][0]:.1f}s "
                      f"compile {results[(scan, n)][-1][1]:.1f}s", flush=True)
    for scan in modes:
        base = median([c for _, c in results[(scan, args.layers[0])]])
        for n in args.layers:
            low = median([x for x, _ in results[(scan, n)]])
            comp = median([c for _, c in results[(scan, n)]])
            rows.append(["scan" if scan else "unrolled", n, f"{low:.2f}", f"{comp:.2f}",
                         f"{comp / base:.2f}x"])
    print()
    print(table(["layers as", "layers", "trace+lower s", "XLA compile s",
                 f"vs {args.layers[0]} layers"], rows))

    # persistent cache: a cold and a warm compile of the same program in one process
    from llmjax import compile_cache
    with tempfile.TemporaryDirectory() as d:
        compile_cache.enable(d)
        cold = compile_seconds(args.layers[0], True)[1]
        jax.clear_caches()
        warm = compile_seconds(args.layers[0], True)[1]
        jax.config.update("jax_compilation_cache_dir", None)
    print(f"\npersistent compilation cache ({args.layers[0]} layers): cold {cold:.2f}s, "
          f"warm (cache hit) {warm:.2f}s")


if __name__ == "__main__":
    main()
