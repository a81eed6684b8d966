"""llmjax vs PyTorch eager on the reference GPT train step (CPU), alternating in one run.

    python benchmarks/vs_torch.py [--steps 20] [--warmup 2] [--variants ...]

Variants (all from the same initial weights, same batches in the same order):
  sdpa-fp32        the GPT PyTorch users write (nanoGPT style): PyTorch eager (torch==2.13.0),
                   F.scaled_dot_product_attention(..., is_causal=True); the reference row
  sdpa-bf16        same, under torch.autocast("cpu", bfloat16), fp32 master weights
  torch-fp32/bf16  the same GPT with attention written by hand (q k^T, masked softmax, p v)
  llmjax-fp32      llmjax with model.kernels=auto (cpu_custom_vjp on CPU)
  llmjax-bf16      same, model.dtype=bfloat16, fp32 params (mixed precision)
  flax-fp32/bf16   llmjax with model.kernels=xla: llmjax's model without the CPU kernels
  textbook-fp32/bf16  the GPT as the Flax examples write it (textbook_flax.py: no llmjax
                   code, Python loop over layers, optax loss): the issue's "straightforward
                   Flax linen step"
Each round runs one step of every variant in turn, so machine-speed drift hits all alike.
Prints the CPU model and whether it has AMX bf16 units (bf16 figures depend on them), median
step time, tokens/s, achieved FLOP/s, fraction of the matmul peak measured in this run, ratios
against both PyTorch GPTs, and the losses after the last step (fp32 llmjax vs torch agree).
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np

from common import (REFERENCE, JaxRunner, jax, jax_batch, jnp, matmul_peak, median,  # noqa: F401
                    reference_config, synthetic_tokens, table, train_flops)
from textbook_flax import TextbookFlaxRunner


def cpu_description() -> str:
    """'<CPU model>, AMX bf16: yes|no' from /proc/cpuinfo (Linux; 'unknown' elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "CPU unknown, AMX bf16: unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    amx = "yes" if {"amx_bf16", "amx_tile"} <= flags else "no"
    return f"CPU {model} ({os.cpu_count()} logical cores), AMX bf16: {amx}"


class TorchGPT:
    """The reference GPT in plain PyTorch, parameters in llmjax's layout (x @ W).

    sdpa=True: attention by F.scaled_dot_product_attention(is_causal=True), as nanoGPT and
    most PyTorch GPTs write it; sdpa=False: by hand (q k^T, masked softmax, p v)."""

    def __init__(self, params: dict, bf16: bool, lr: float = 1e-3, sdpa: bool = False):
        import torch
        self.torch, self.bf16, self.sdpa = torch, bf16, sdpa
        torch.manual_seed(0)
        r = REFERENCE
        L, d, h = r["layers"], r["d_model"], r["heads"]
        dec, emb = params["decoder"], params["embed"]
        lay = dec["layers"]
        t = lambda a: torch.tensor(np.asarray(a, np.float32)).requires_grad_(True)  # noqa: E731
        a = lay["attention"]
        self.p = {
            "wte": t(emb["token"]["embedding"]), "wpe": t(emb["position"]["embedding"]),
            "lnf_s": t(dec["final_norm"]["scale"]), "lnf_b": t(dec["final_norm"]["bias"]),
        }
        for i in range(L):
            qkv_w = np.concatenate([np.asarray(a[n]["kernel"][i]).reshape(d, d)
                                    for n in ("query", "key", "value")], axis=1)
            qkv_b = np.concatenate([np.asarray(a[n]["bias"][i]).reshape(d)
                                    for n in ("query", "key", "value")])
            self.p.update({
                f"{i}.ln1_s": t(lay["attention_norm"]["scale"][i]),
                f"{i}.ln1_b": t(lay["attention_norm"]["bias"][i]),
                f"{i}.qkv_w": t(qkv_w), f"{i}.qkv_b": t(qkv_b),
                f"{i}.o_w": t(np.asarray(a["out"]["kernel"][i]).reshape(d, d)),
                f"{i}.o_b": t(a["out"]["bias"][i]),
                f"{i}.ln2_s": t(lay["mlp_norm"]["scale"][i]),
                f"{i}.ln2_b": t(lay["mlp_norm"]["bias"][i]),
                f"{i}.wi_w": t(lay["mlp"]["wi"]["kernel"][i]), f"{i}.wi_b": t(lay["mlp"]["wi"]["bias"][i]),
                f"{i}.wo_w": t(lay["mlp"]["wo"]["kernel"][i]), f"{i}.wo_b": t(lay["mlp"]["wo"]["bias"][i]),
            })
        self.L, self.d, self.h = L, d, h
        decay = [v for k, v in self.p.items() if not (k.endswith("_s") or k.endswith("_b"))]
        no_decay = [v for k, v in self.p.items() if k.endswith("_s") or k.endswith("_b")]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=(0.9, 0.95), eps=1e-8)
        s = r["seq"]
        self.causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)

    def loss(self, tokens):
        torch, F, p = self.torch, self.torch.nn.functional, self.p
        b, s = tokens.shape
        d, h = self.d, self.h
        hd = d // h
        x = p["wte"][tokens] + p["wpe"][:s][None]
        for i in range(self.L):
            y = F.layer_norm(x, (d,), p[f"{i}.ln1_s"], p[f"{i}.ln1_b"], 1e-5)
            qkv = y @ p[f"{i}.qkv_w"] + p[f"{i}.qkv_b"]
            q, k, v = qkv.view(b, s, 3, h, hd).permute(2, 0, 3, 1, 4)
            if self.sdpa:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-1, -2)) * hd ** -0.5
                att = att.float().masked_fill(self.causal, -1e30).softmax(-1).to(v.dtype)
                o = att @ v
            o = o.transpose(1, 2).reshape(b, s, d)
            x = x + (o @ p[f"{i}.o_w"] + p[f"{i}.o_b"])
            y = F.layer_norm(x, (d,), p[f"{i}.ln2_s"], p[f"{i}.ln2_b"], 1e-5)
            y = F.gelu(y @ p[f"{i}.wi_w"] + p[f"{i}.wi_b"], approximate="tanh")
            x = x + (y @ p[f"{i}.wo_w"] + p[f"{i}.wo_b"])
        x = F.layer_norm(x, (d,), p["lnf_s"], p["lnf_b"], 1e-5)
        logits = x @ p["wte"].t()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               tokens[:, 1:].reshape(-1))

    def step(self, tokens_np) -> float:
        torch = self.torch
        tokens = torch.from_numpy(tokens_np.astype(np.int64))
        self.opt.zero_grad(set_to_none=True)
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = self.loss(tokens)
        else:
            loss = self.loss(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.p.values()), 1.0)
        self.opt.step()
        return float(loss.detach())


def paired(times: dict, ref: str, name: str, warmup: int) -> str:
    """Median over rounds of time[ref] / time[name] within the same round."""
    if ref not in times:
        return "-"
    ratios = [r / t for r, t in zip(times[ref][warmup:], times[name][warmup:])]
    return f"{median(ratios):.2f}x"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per variant, warm-up included")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=[
        "sdpa-fp32", "torch-fp32", "llmjax-fp32", "flax-fp32", "textbook-fp32",
        "sdpa-bf16", "torch-bf16", "llmjax-bf16", "flax-bf16", "textbook-bf16"])
    args = ap.parse_args()
    import time
    import torch
    torch.set_num_threads(torch.get_num_threads())

    base = JaxRunner(reference_config("float32", kernels="xla"))
    params0 = jax.tree.map(np.asarray, base.state.params)
    del base
    runners, compile_s = {}, {}
    for name in args.variants:
        fw, prec = name.split("-")
        if fw in ("torch", "sdpa"):
            runners[name] = TorchGPT(params0, bf16=prec == "bf16", sdpa=fw == "sdpa")
            continue
        if fw == "textbook":
            runners[name] = TextbookFlaxRunner(params0, bf16=prec == "bf16")
            continue
        dtype = "bfloat16" if prec == "bf16" else "float32"
        kernels = "auto" if fw == "llmjax" else "xla"
        runners[name] = JaxRunner(reference_config(dtype, kernels=kernels), seed_params=params0)
    batches = [synthetic_tokens(i) for i in range(args.steps)]
    jbatches = [jax_batch(b) for b in batches]
    print(cpu_description(), flush=True)
    times = {n: [] for n in runners}
    losses = {n: [] for n in runners}
    for i in range(args.steps):
        for name, r in runners.items():
            if isinstance(r, TorchGPT):
                t = time.perf_counter()
                loss = r.step(batches[i])
                dt = time.perf_counter() - t
            elif i == 0:
                compile_s[name], loss = r.compile(jbatches[0])  # compile + first step
                dt = float("nan")
            else:
                dt, loss = r.step(jbatches[i])
            times[name].append(dt)
            losses[name].append(loss)
        print(f"round {i + 1}/{args.steps}: " + ", ".join(
            f"{n} {times[n][-1]:.2f}s" for n in runners), flush=True)
    peak32 = matmul_peak(jnp.float32)
    peak16 = matmul_peak(jnp.bfloat16)
    flops = train_flops()
    tokens = REFERENCE["batch"] * REFERENCE["seq"]
    med = {n: median(t[args.warmup:]) for n, t in times.items()}
    rows = []
    for name in runners:
        prec = name.split("-")[1]
        peak = peak16 if prec == "bf16" else peak32
        rows.append([name, f"{med[name] * 1e3:.0f}", f"{tokens / med[name]:,.0f}",
                     f"{flops / med[name] / 1e9:.1f}", f"{flops / med[name] / peak:.0%}",
                     paired(times, f"sdpa-{prec}", name, args.warmup),
                     paired(times, f"torch-{prec}", name, args.warmup),
                     paired(times, f"flax-{prec}", name, args.warmup),
                     paired(times, f"textbook-{prec}", name, args.warmup),
                     f"{losses[name][-1]:.4f}" if not math.isnan(losses[name][-1]) else "-"])
    print()
    print(cpu_description())
    print(f"reference GPT {REFERENCE}, {flops / 1e9:.1f} GFLOP per step; "
          f"matmul peak this run: f32 {peak32 / 1e9:.0f} GFLOP/s, "
          f"bf16xbf16->f32 {peak16 / 1e9:.0f} GFLOP/s; medians of {args.steps - args.warmup} "
          f"alternating steps; compile (+1st step) "
          + ", ".join(f"{n} {s:.1f}s" for n, s in compile_s.items()))
    print(table(["variant", "step ms", "tokens/s", "GFLOP/s", "of peak", "vs sdpa (paired)",
                 "vs torch hand-written (paired)", "vs flax (paired)", "vs textbook (paired)",
                 f"loss@{args.steps}"], rows))
    print("ratios: speed-up = reference time / variant time (> 1: faster than the reference); "
          "'paired' = median over rounds of the per-round ratio (robust to drift between rounds)")
    torch_ref = next((n for n in ("sdpa-fp32", "torch-fp32") if n in losses), None)
    if torch_ref and "llmjax-fp32" in losses:
        a, b = losses[torch_ref][-1], losses["llmjax-fp32"][-1]
        print(f"\nloss after {args.steps} steps, fp32: {torch_ref} {a:.5f}  llmjax {b:.5f}  "
              f"|diff| {abs(a - b):.2e}")
        print(f"per-step losses {torch_ref}:", " ".join(f"{x:.3f}" for x in losses[torch_ref]))
        print("per-step losses llmjax:", " ".join(f"{x:.3f}" for x in losses["llmjax-fp32"]))
    if "textbook-fp32" in losses:
        print("per-step losses textbook:", " ".join(f"{x:.3f}" for x in losses["textbook-fp32"]))


if __name__ == "__main__":
    main()
