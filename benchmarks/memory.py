"""Compiled memory of the train step per remat policy (compiled.memory_analysis()).

    python benchmarks/memory.py [--kernels auto xla] [--dtype float32] [--batch 8]

For the reference GPT (6 layers, d 384, seq 256, batch 8, vocab 8192), each policy of
model.remat (none / dots / dots_no_batch / full) is compiled and XLA's own buffer
assignment is reported: arguments (params + Adam state + batch), outputs, aliased
(donated) bytes, temporaries (activations kept for the backward + scratch), and the peak
estimate args + outputs - aliased + temps. Expected order of temps: none > dots >= dots_no_batch > full.
"""
from __future__ import annotations

import argparse

from common import jax, jax_batch, reference_config, synthetic_tokens, table

POLICIES = ["none", "dots", "dots_no_batch", "full"]
MiB = 1024 * 1024


def analyse(remat: str, kernels: str, dtype: str, batch: int):
    from llmjax.train.experiment import build
    cfg = reference_config(dtype, kernels=kernels, remat=remat)
    cfg.train.batch_size = batch
    exp = build(cfg, devices=jax.devices()[:1])
    step = exp.train_step(["tokens", "segment_ids"])
    compiled = step.lower(exp.abstract_state(), jax_batch(synthetic_tokens(0, batch=batch))).compile()
    return compiled.memory_analysis()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="+", default=["auto", "xla"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    args = ap.parse_args()
    rows = []
    for kernels in args.kernels:
        base = None
        for remat in args.policies:
            m = analyse(remat, kernels, args.dtype, args.batch)
            peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                    + m.temp_size_in_bytes)
            base = base or m.temp_size_in_bytes
            rows.append([kernels, remat, f"{m.argument_size_in_bytes / MiB:.1f}",
                         f"{m.output_size_in_bytes / MiB:.1f}", f"{m.alias_size_in_bytes / MiB:.1f}",
                         f"{m.temp_size_in_bytes / MiB:.1f}", f"{m.temp_size_in_bytes / base:.2f}x",
                         f"{peak / MiB:.1f}"])
            print(rows[-1], flush=True)
    print()
    print(f"reference GPT, {args.dtype}, batch {args.batch}; MiB from compiled.memory_analysis()")
    print(table(["kernels", "remat", "args", "outputs", "aliased", "temps", "temps vs none",
                 "peak est."], rows))


if __name__ == "__main__":
    main()
