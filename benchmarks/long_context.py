"""Long context on 8 CPU devices: the reference GPT's train step with its sequence split over
the `context` mesh axis (mesh.context, model.context_parallel; docs/long-context.md).

    python benchmarks/long_context.py                      # both tables (minutes, see below)
    python benchmarks/long_context.py --memory-only        # compiles only: the memory table
    python benchmarks/long_context.py --seqs 2048 --steps 2 --strategies ring
    python benchmarks/long_context.py --speed-only --seqs 32768 --contexts 8 --steps 1 --warmup 0

One row of `seq` tokens (batch 1: a sequence one device would otherwise hold whole) on
`context` devices (mesh data=1, context=c), the reference GPT (6 layers, d 384, 6 heads,
d_ff 1536, vocab 8192, fp32, AdamW; max_len raised to the sequence length), causal LM,
load balanced. Context 1 is the ordinary model on one device (model.kernels=auto: the
blockwise CPU attention, which never holds the whole score matrix either, under the dense
[t, t] mask); context > 1 runs the context-parallel op with either strategy.

Table 1 (memory): per-device bytes from compiled.memory_analysis() of the whole train step at
--memory-seq (8192) for context 1, 2, 4, 8: temporaries (activations kept for the backward,
logits, scratch) should fall about as 1/context; arguments (parameters + Adam state,
replicated here: add mesh.fsdp to split them) do not. Compile only: nothing is allocated.

Table 2 (speed): median step time and tokens/s over --steps steps after a warm-up step, at
--seqs (2048, 8192) for --contexts (1 and 8). The 8 devices share this machine's
cores, so context 8 does the same arithmetic as context 1 on the same cores plus the
communication: the table shows that overhead, not a speed-up (that needs real chips).
Figures taken on a shared machine vary far more than the usual +-25%.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from common import jax, median, np, reference_config, synthetic_tokens, table  # noqa: E402

MiB = 1024 * 1024
KEYS = ("tokens", "segment_ids")


def experiment(seq: int, context: int, strategy: str):
    """The reference GPT's Experiment for one row of `seq` tokens on `context` devices."""
    from llmjax.train.experiment import build
    cfg = reference_config(max_len=seq, context_parallel=strategy)
    cfg.train.batch_size, cfg.train.seq_len = 1, seq
    cfg.mesh.context = context
    cfg.validate()
    return build(cfg, devices=jax.devices()[:context])


def compiled_step(exp, seq: int):
    step = exp.train_step(KEYS)
    spec = {k: jax.ShapeDtypeStruct((1, seq), np.int32) for k in KEYS}
    t = time.perf_counter()
    compiled = step.lower(exp.abstract_state(), spec).compile()
    return step, compiled, time.perf_counter() - t


def memory_rows(seq: int, contexts, strategies):
    rows, base = [], None
    for context in contexts:
        for strategy in (strategies if context > 1 else ["-"]):
            exp = experiment(seq, context, strategy if context > 1 else "allgather")
            _, compiled, seconds = compiled_step(exp, seq)
            m = compiled.memory_analysis()
            base = base or m.temp_size_in_bytes
            rows.append([context, strategy, f"{m.temp_size_in_bytes / MiB:,.0f}",
                         f"{base / m.temp_size_in_bytes:.1f}x",
                         f"{m.argument_size_in_bytes / MiB:,.0f}", f"{seconds:.0f}"])
            print(rows[-1], flush=True)
    return rows


def speed_rows(seqs, contexts, strategies, steps: int, warmup: int = 1):
    from llmjax.data.device import to_global
    rows = []
    for seq in seqs:
        for context in contexts:
            for strategy in (strategies if context > 1 else ["-"]):
                exp = experiment(seq, context, strategy if context > 1 else "allgather")
                _, compiled, seconds = compiled_step(exp, seq)
                state = exp.init_state()
                sh = exp.batch_shardings(KEYS)
                times, losses = [], []
                for i in range(steps + warmup):  # warm-up steps are not timed
                    tokens = synthetic_tokens(i, batch=1, seq=seq)
                    batch = to_global({"tokens": tokens,
                                       "segment_ids": np.ones_like(tokens)}, sh)
                    t = time.perf_counter()
                    # The executable compiled above: no step pays for a compile, so a long
                    # sequence's row can do without the warm-up (--warmup 0).
                    state, metrics = compiled(state, batch)
                    losses.append(float(metrics["loss"]))
                    times.append(time.perf_counter() - t)
                step_s = median(times[warmup:])
                temps = compiled.memory_analysis().temp_size_in_bytes / MiB
                rows.append([seq, context, strategy, f"{seconds:.0f}", f"{step_s:.2f}",
                             f"{seq / step_s:,.0f}", f"{temps:,.0f}", f"{losses[0]:.4f}"])
                print(rows[-1], flush=True)
                del state
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-seq", type=int, default=8192)
    ap.add_argument("--memory-contexts", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--strategies", nargs="+", default=["allgather", "ring"])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per row (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps before them (0: time the first step; nothing compiles "
                         "while timing, the step is compiled ahead)")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--speed-only", action="store_true")
    args = ap.parse_args()
    if not args.speed_only:
        rows = memory_rows(args.memory_seq, args.memory_contexts, args.strategies)
        print(f"\nreference GPT train step, batch 1 x {args.memory_seq} tokens, fp32, per "
              f"device (compiled.memory_analysis(), MiB)")
        print(table(["context", "strategy", "temporaries", "vs context 1", "arguments",
                     "compile s"], rows))
    if not args.memory_only:
        rows = speed_rows(args.seqs, args.contexts, args.strategies, args.steps, args.warmup)
        print(f"\nreference GPT train step, batch 1, fp32, {args.steps} timed steps (median) "
              f"after {args.warmup} warm-up, "
              f"8 CPU devices sharing the machine's cores")
        print(table(["seq", "context", "strategy", "compile s", "step s", "tokens/s",
                     "temporaries MiB", "first loss"], rows))


if __name__ == "__main__":
    main()
