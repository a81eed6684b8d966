"""PEFT on the reference GPT: trainable share, optimizer-state bytes and step time.

    python benchmarks/peft.py                      # full, lora (r=8, attention q/v), ia3, prompt
    python benchmarks/peft.py --methods lora ia3 --steps 20 --devices 1

Reference GPT: 6 layers, d_model 384, 6 heads, d_ff 1536, vocab 8192, seq 256, batch 8,
synthetic token ids, AdamW, fp32. Step time = median wall time of the timed steps (after
a compile step and one warm-up step), blocking on the loss.
"""
from __future__ import annotations

import argparse
import statistics
import time

METHODS = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "rank": 8, "alpha": 16, "targets": "attention/(query|value)/"},
    "ia3": {"method": "ia3"},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 20},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 20},
    "adapters": {"method": "adapters", "adapter_dim": 64},
    "bitfit": {"method": "bitfit"},
    "ffn_only": {"method": "ffn_only"},
}
MODEL = {"preset": "gpt-tiny", "vocab_size": 8192, "d_model": 384, "num_layers": 6,
         "num_heads": 6, "d_ff": 1536, "max_len": 512}


def run(method: str, steps: int, devices: int, seq_len: int, batch: int) -> dict:
    import jax

    from llmjax.config import from_dict
    from llmjax.data.device import to_global
    from llmjax.data.pipeline import make_iterator
    from llmjax.peft.report import count, nbytes
    from llmjax.train.experiment import build

    config = from_dict({"model": MODEL, "objective": {"name": "clm"},
                        "mesh": {"data": devices},
                        "data": {"source": "synthetic", "synthetic_vocab_size": 8192},
                        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 0},
                        "train": {"batch_size": batch, "seq_len": seq_len, "steps": 1000},
                        "peft": METHODS[method]})
    exp = build(config, devices=jax.devices()[:devices])
    state = exp.init_state()
    it = make_iterator(config.data, exp.objective.batch_kind, seq_len, batch,
                       vocab_size=config.model.vocab_size)
    host = next(it)
    step = exp.train_step(host.keys())
    data = to_global(host, next(iter(exp.batch_shardings(host.keys()).values())))
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    state, metrics = step(state, data)
    float(metrics["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
    trainable, frozen = count(state.params), count(state.frozen)
    return {"method": method, "trainable": trainable, "total": trainable + frozen,
            "opt_bytes": nbytes(state.opt_state), "step_ms": 1e3 * statistics.median(times),
            "compile_s": compile_s, "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "ia3", "prompt_tuning"],
                        choices=sorted(METHODS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--devices", type=int, default=1, help="data-parallel devices")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import jax
    print(f"backend {jax.default_backend()}, {args.devices} device(s), seq {args.seq_len}, "
          f"batch {args.batch}, {args.steps} timed steps")
    rows = [run(m, args.steps, args.devices, args.seq_len, args.batch) for m in args.methods]
    full = next((r for r in rows if r["method"] == "full"), None)
    print("| method | trainable params | % of total | optimizer state | vs full | "
          "step time (ms) | vs full | compile (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel_opt = f"{100 * r['opt_bytes'] / full['opt_bytes']:.2f}%" if full else "-"
        rel_t = f"{r['step_ms'] / full['step_ms']:.2f}x" if full else "-"
        print(f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.3f}% "
              f"| {r['opt_bytes'] / 2**20:.2f} MiB | {rel_opt} | {r['step_ms']:.1f} | {rel_t} "
              f"| {r['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
