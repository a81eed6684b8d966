"""Compile llmjax's train step for Cloud TPU slices on this CPU host (libtpu, no TPU) and
print per-chip HBM, compile time, estimated step time and MFU of the sweep's best
configuration (or, with --fixed, of one given configuration per model), as a Markdown table
row per model x target, with where the estimated step time goes.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py --models gpt2-small \
        --targets v5e-256 --max-configs 4
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py --models llama2-70b \
        --targets v5p-128 --fixed

The figures are estimates from the compiled program (llmjax/plan/: a roofline over the
optimized HLO), not measurements on a TPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmjax import config  # noqa: E402
from llmjax.plan import aot, sweep, topology  # noqa: E402

# Experiment per model: objective and sequence length as each family is trained; bf16
# compute with fp32 master weights, splash where the model allows it (attention_impl=auto).
MODELS = {
    "gpt2-small": ("configs/experiments/gpt-tiny.yaml", ["model=gpt2-small"], 1024),
    "bert-large": ("configs/experiments/bert-tiny.yaml", ["model=bert-large"], 512),
    "t5-v1_1-base": ("configs/experiments/t5-tiny.yaml", ["model=t5-v1_1-base"], 512),
    "llama2-7b": ("configs/experiments/llama-tiny.yaml", ["model=llama2-7b"], 2048),
    "llama2-7b-32k": ("configs/experiments/llama-tiny.yaml", ["model=llama2-7b"], 32768),
    "llama2-70b": ("configs/experiments/llama-tiny.yaml", ["model=llama2-70b"], 2048),
    # MaxText's Llama 3.1 8B figure is at 8192 tokens; the 128K-vocabulary head in chunks.
    "llama3.1-8b": ("configs/experiments/llama-tiny.yaml", ["model=llama3.1-8b",
                                                           "train.logits_chunk=1024"], 8192),
    "mixtral-8x7b": ("configs/experiments/moe-tiny.yaml", ["model=mixtral-8x7b"], 4096),
    # The capacity-based experts (GSPMD-sharded dispatch/combine einsums) over an expert axis:
    # dropless sorts the whole global batch on every chip (an all-gather before the sort).
    "mixtral-8x7b-dense": ("configs/experiments/moe-tiny.yaml", ["model=mixtral-8x7b",
                                                                "model.moe_impl=dense"], 4096),
}
COMMON = ["model.dtype=bfloat16", "model.attention_impl=auto", "data.source=synthetic"]
# --fixed: one configuration per model instead of a sweep (the big models: a compile takes
# minutes here), pure FSDP as MaxText runs these (ici_fsdp_parallelism=-1).
FIXED = {
    "bert-large": sweep.Choice(1, -1, 1, "full", 16),
    "t5-v1_1-base": sweep.Choice(1, -1, 1, "full", 16),
    "llama2-7b-32k": sweep.Choice(1, -1, 1, "full", 1),
    "llama2-70b": sweep.Choice(1, -1, 1, "full", 4),
    "llama3.1-8b": sweep.Choice(1, -1, 1, "full", 2),
    "mixtral-8x7b": sweep.Choice(1, -1, 1, "full", 4),
    "mixtral-8x7b-dense": sweep.Choice(1, -1, 1, "full", 4, expert=8),
}
# MaxText's published MFU (github.com/AI-Hypercomputer/maxtext: README's v5p table;
# docs/reference/models/tiering.md for v6e, "256 Chips, BF16, SL=8192" for Llama 3.1 8B).
MAXTEXT = {("llama2-70b", "v5p-128"): "65.4%", ("llama3.1-8b", "v6e-256"): "45.46%"}


def spent(p: aot.Plan) -> str:
    """Where the estimated step time goes: compute (its HBM-bound share, the splash kernel's
    share), ICI collectives, and compiled FLOPs over model FLOPs (remat recompute)."""
    t = p.times()
    chip = p.target.chip
    attn = p.train.attention_flops / chip.peak_flops
    hlo_flops = p.train.roofline.flops + p.train.attention_flops
    return (f"compute {t['compute'] * 1e3:,.0f} ms ({p.train.roofline.bytes_bound_seconds / t['compute'] * 100:.0f}% "
            f"HBM-bound, {attn / t['compute'] * 100:.0f}% splash); ICI {t['ici'] * 1e3:,.0f} ms; "
            f"compiled/model FLOPs {hlo_flops / p.model_flops:.2f}")


def causal_mfu(p: aot.Plan, cfg) -> float:
    """MFU with a causal decoder's attention counted half (MaxText's count since 2025):
    llmjax.metrics counts the full t x t score matrix, 12 L d_attn t FLOPs per token."""
    m = cfg.model
    if m.architecture != "decoder":
        return p.mfu
    attention = 12 * m.num_layers * m.num_heads * m.dim_per_head * cfg.train.seq_len
    half = attention / 2 * p.tokens_per_step / p.target.num_chips
    return (p.model_flops - half) / (p.step_seconds * p.target.chip.peak_flops)


def row(model, name, label, p, seconds, maxtext, cfg) -> str:
    total = max(s.memory.total for s in p.steps.values())
    mfu = f"{p.mfu * 100:.1f}%"
    if cfg.model.architecture == "decoder":
        mfu += f" ({causal_mfu(p, cfg) * 100:.1f}% causal)"
    return (f"| {model} | {name} | {label} | {total / 2**30:.2f} | {seconds:.0f} | "
            f"{p.step_seconds * 1e3:,.1f} | {mfu} | {spent(p)} | {maxtext} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--targets", nargs="+", default=["v5e-256", "v5p-128", "v6e-256"])
    parser.add_argument("--max-configs", type=int, default=6)
    parser.add_argument("--fixed", action="store_true",
                        help="compile FIXED's configuration for the models that have one")
    parser.add_argument("--remat", default=None, choices=sweep.REMATS,
                        help="with --fixed: this remat policy instead of FIXED's")
    args = parser.parse_args()
    aot.require_libtpu()
    print("| model (seq) | target | configuration | HBM/chip GiB | compile s | est. step ms "
          "| est. MFU | where the time goes | MaxText MFU |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for model in args.models:
        path, overrides, seq = MODELS[model]
        overrides = overrides + COMMON + [f"train.seq_len={seq}", f"model.max_len={seq}"]
        label_model = f"{model} ({seq})"
        for name in args.targets:
            target = topology.parse(name)
            maxtext = MAXTEXT.get((model, name), "-")
            begin = time.perf_counter()
            if args.fixed and model in FIXED:
                choice = FIXED[model]
                fsdp = target.num_chips // (choice.data * choice.tensor * choice.expert)
                choice = dataclasses.replace(choice, fsdp=fsdp,
                                             remat=args.remat or choice.remat)
                cfg = config.load(path, overrides + choice.overrides(target))
                p = aot.plan(cfg, target, steps=("train",))
                if not (p.fits and p.train):
                    print(f"| {label_model} | {name} | {choice.label()}: does not fit, "
                          f"{p.shortfall / 2**20:,.0f} MiB over ({p.note[:120]}) | | "
                          f"{time.perf_counter() - begin:.0f} | | | | {maxtext} |", flush=True)
                    continue
                print(row(label_model, name, choice.label(), p, p.train.compile_seconds, maxtext,
                          cfg), flush=True)
                continue
            rows = sweep.sweep(path, overrides, target, args.max_configs)
            best = sweep.ranked(rows)
            if not best:
                print(f"| {label_model} | {name} | nothing fits in {args.max_configs} tries | | "
                      f"{time.perf_counter() - begin:.0f} | | | | {maxtext} |", flush=True)
                continue
            p, choice = best[0].plan, best[0].choice
            cfg = config.load(path, overrides + choice.overrides(target))
            print(row(label_model, name, choice.label(), p, p.train.compile_seconds, maxtext,
                      cfg), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
