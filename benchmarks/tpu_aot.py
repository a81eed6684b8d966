"""Compile llmjax's train step for Cloud TPU slices on this CPU host (libtpu, no TPU) and
print per-chip HBM, compile time, estimated step time and MFU of the sweep's best
configuration (or of one given mesh), as a Markdown table row per model x target.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py --models gpt2-small \
        --targets v5e-256 --max-configs 4

The figures are estimates from the compiled program (llmjax/plan/: a roofline over the
optimized HLO), not measurements on a TPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmjax.plan import aot, sweep, topology  # noqa: E402

# Experiment per model: objective and sequence length as each family is trained; bf16
# compute with fp32 master weights, splash where the model allows it (attention_impl=auto).
MODELS = {
    "gpt2-small": ("configs/experiments/gpt-tiny.yaml", ["model=gpt2-small", "train.seq_len=1024"]),
    "bert-large": ("configs/experiments/bert-tiny.yaml", ["model=bert-large", "train.seq_len=512"]),
    "t5-v1_1-base": ("configs/experiments/t5-tiny.yaml", ["model=t5-v1_1-base",
                                                         "train.seq_len=512"]),
    "llama2-7b": ("configs/experiments/llama-tiny.yaml", ["model=llama2-7b",
                                                         "train.seq_len=2048"]),
    "llama2-70b": ("configs/experiments/llama-tiny.yaml", ["model=llama2-70b",
                                                          "train.seq_len=2048"]),
}
COMMON = ["model.dtype=bfloat16", "model.attention_impl=auto", "data.source=synthetic"]
# MaxText's published MFU (github.com/AI-Hypercomputer/maxtext, README / v5p and v6e tables).
MAXTEXT = {("llama2-70b", "v5p-128"): "65.4%"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--targets", nargs="+", default=["v5e-256", "v5p-128", "v6e-256"])
    parser.add_argument("--max-configs", type=int, default=6)
    args = parser.parse_args()
    aot.require_libtpu()
    print("| model | target | best configuration | HBM/chip GiB | compile s | est. step ms "
          "| est. MFU | time in HBM-bound ops / collectives (ICI) | MaxText MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        path, overrides = MODELS[model]
        for name in args.targets:
            target = topology.parse(name)
            begin = time.perf_counter()
            rows = sweep.sweep(path, overrides + COMMON + ["model.max_len=" + overrides[-1]
                               .split("=")[1]], target, args.max_configs)
            best = sweep.ranked(rows)
            if not best:
                print(f"| {model} | {name} | nothing fits in {args.max_configs} tries | | "
                      f"{time.perf_counter() - begin:.0f} | | | | {MAXTEXT.get((model, name), '')} |")
                continue
            p, choice = best[0].plan, best[0].choice
            total = max(s.memory.total for s in p.steps.values())
            t = p.times()
            where = (f"{p.train.roofline.bytes_bound_seconds / t['step'] * 100:.0f}% / "
                     f"{t['ici'] / t['step'] * 100:.0f}%")
            print(f"| {model} | {name} | {choice.label()} | {total / 2**30:.2f} | "
                  f"{p.train.compile_seconds:.0f} | {p.step_seconds * 1e3:,.1f} | "
                  f"{p.mfu * 100:.1f}% | {where} | {MAXTEXT.get((model, name), '')} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
