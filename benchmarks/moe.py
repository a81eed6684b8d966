"""Mixture of experts on CPU: step time, tokens/s and compiled temporaries of a tiny MoE
(8 SwiGLU experts, top-2) with each expert computation, against the dense model of equal
active parameters (d_ff = 2 x expert width).

    python benchmarks/moe.py [--steps 6] [--layers 4] [--d-model 256] [--expert-ff 512]

One device, fp32, AdamW; variants run alternately one step each per round, medians after
one warm-up round. XLA:CPU lowers ragged_dot densely (FACTS.md): the dropless path is
correct here, not fast; the numbers compare the paths' overheads, not TPU performance.
"""
from __future__ import annotations

import argparse

from common import jax_batch, median, synthetic_tokens, table

import jax  # noqa: E402


def config(args, **moe):
    from llmjax.config import from_dict
    return from_dict({
        "model": {"preset": "moe-tiny", "vocab_size": args.vocab, "d_model": args.d_model,
                  "num_layers": args.layers, "num_heads": 4, "num_kv_heads": 4,
                  "max_len": args.seq, "d_ff": args.expert_ff, **moe},
        "objective": {"name": "clm"}, "mesh": {"data": 1},
        "train": {"batch_size": args.batch, "seq_len": args.seq, "steps": 1000},
        "optimizer": {"name": "adamw", "learning_rate": 1e-3, "schedule": "constant",
                      "warmup_steps": 0},
    })


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--expert-ff", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    from llmjax.models import abstract_params, param_count
    from llmjax.models.moe import inactive_params
    from llmjax.train.experiment import build
    variants = {
        "dense MLP (equal active)": config(args, num_experts=0, d_ff=2 * args.expert_ff),
        "moe dropless (ragged_dot)": config(args, moe_impl="dropless"),
        "moe dense dispatch cf 1.25": config(args, moe_impl="dense", capacity_factor=1.25),
    }
    batches = [jax_batch(synthetic_tokens(i, args.batch, args.seq, args.vocab))
               for i in range(args.steps + 1)]
    runs = {}
    for name, cfg in variants.items():
        exp = build(cfg, devices=jax.devices()[:1])
        state = exp.init_state()
        step = exp.train_step(["tokens", "segment_ids"])
        compiled = step.lower(state, batches[0]).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        total = param_count(abstract_params(cfg.model))
        runs[name] = dict(exp=exp, state=state, step=step, temp=temp, times=[], total=total,
                          active=total - inactive_params(cfg.model))
        runs[name]["state"], _ = step(state, batches[0])  # warm-up
    import time
    for i in range(1, args.steps + 1):
        for r in runs.values():
            t = time.perf_counter()
            r["state"], m = r["step"](r["state"], batches[i])
            float(m["loss"])
            r["times"].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    rows = []
    for name, r in runs.items():
        t = median(r["times"])
        rows.append([name, f"{r['total']:,}", f"{r['active']:,}", f"{t * 1e3:.0f}",
                     f"{tokens / t:,.0f}", f"{r['temp'] / 2**20:.1f}"])
    print(table(["variant", "params", "active", "step ms", "tokens/s", "temporaries MiB"], rows))


if __name__ == "__main__":
    main()
