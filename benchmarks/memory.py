"""Compiled memory of the train step per remat policy (compiled.memory_analysis()).

    python benchmarks/memory.py [--kernels auto xla] [--dtype float32] [--batch 8]
                                [--logits-chunks 0 64]

For the reference GPT (6 layers, d 384, seq 256, batch 8, vocab 8192), each policy of
model.remat (none / dots / dots_no_batch / full) is compiled and XLA's own buffer
assignment is reported: arguments (params + Adam state + batch), outputs, aliased
(donated) bytes, temporaries (activations kept for the backward + scratch), and the peak
estimate args + outputs - aliased + temps. Expected order of temps: none > dots >= dots_no_batch > full.
`--logits-chunks` adds rows with train.logits_chunk (the LM head + cross-entropy over that
many positions at a time; 0 = whole logits). `--preset gpt2-small --seq 1024` measures a
model preset instead of the reference GPT (compiles only: no memory is allocated).
"""
from __future__ import annotations

import argparse

from common import jax, np, reference_config, table

POLICIES = ["none", "dots", "dots_no_batch", "full"]
MiB = 1024 * 1024


def analyse(remat: str, kernels: str, dtype: str, batch: int, logits_chunk: int = 0,
            preset: str = "", seq: int = 0):
    from llmjax.config import model_config
    from llmjax.train.experiment import build
    cfg = reference_config(dtype, kernels=kernels, remat=remat)
    if preset:  # the preset's architecture, same optimizer and objective
        cfg.model = model_config(preset, dtype=dtype, kernels=kernels, remat=remat,
                                 max_len=max(seq, 1), param_dtype="float32")
    seq = seq or cfg.train.seq_len
    cfg.train.batch_size, cfg.train.seq_len, cfg.train.logits_chunk = batch, seq, logits_chunk
    exp = build(cfg, devices=jax.devices()[:1])
    step = exp.train_step(["tokens", "segment_ids"])
    spec = {k: jax.ShapeDtypeStruct((batch, seq), np.int32) for k in ("tokens", "segment_ids")}
    compiled = step.lower(exp.abstract_state(), spec).compile()
    return compiled.memory_analysis()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="+", default=["auto", "xla"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--logits-chunks", nargs="+", type=int, default=[0])
    ap.add_argument("--preset", default="", help="a model preset instead of the reference GPT")
    ap.add_argument("--seq", type=int, default=0, help="sequence length (default: 256)")
    args = ap.parse_args()
    rows = []
    for kernels in args.kernels:
        base = None
        for remat, chunk in [(r, c) for r in args.policies for c in args.logits_chunks]:
            m = analyse(remat, kernels, args.dtype, args.batch, chunk, args.preset, args.seq)
            peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                    + m.temp_size_in_bytes)
            base = base or m.temp_size_in_bytes
            rows.append([kernels, remat, chunk, f"{m.argument_size_in_bytes / MiB:.1f}",
                         f"{m.output_size_in_bytes / MiB:.1f}", f"{m.alias_size_in_bytes / MiB:.1f}",
                         f"{m.temp_size_in_bytes / MiB:.1f}", f"{m.temp_size_in_bytes / base:.2f}x",
                         f"{peak / MiB:.1f}"])
            print(rows[-1], flush=True)
    print()
    print(f"{args.preset or 'reference GPT'}, {args.dtype}, batch {args.batch}, seq "
          f"{args.seq or 256}; MiB from compiled.memory_analysis()")
    print(table(["kernels", "remat", "logits_chunk", "args", "outputs", "aliased", "temps", "temps vs first row",
                 "peak est."], rows))


if __name__ == "__main__":
    main()
