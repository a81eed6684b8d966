"""GPT-2 small (124M) train-step MFU on an accelerator, llmjax vs PyTorch (torch.compile).

Issue 8, goal 5: one prepared script for a session that has the GPU machine (or a TPU VM).

    python benchmarks/gpu_mfu.py                       # the backend's variants, then torch
    python benchmarks/gpu_mfu.py --variants xla cudnn --torch none
    python benchmarks/gpu_mfu.py --tiny --torch eager  # a minute on CPU: checks the script

llmjax variants: `model.attention_impl` xla | cudnn | splash (| auto); default xla and
cudnn on GPU, xla and splash (Pallas) on TPU, xla on CPU; each with `model.remat`
none or dots (`--remat`). bf16 compute, fp32 master weights, AdamW, seq 1024, vocab padded
to 50304 (as nanoGPT does; `--vocab 50257` for the exact GPT-2 table) on both sides.
PyTorch: the same architecture in plain torch (scaled_dot_product_attention, fused AdamW,
bf16 autocast), `torch.compile`d unless `--torch eager`; skipped when torch is missing or
sees no GPU.
It runs first, in a child process (eager if compiling fails), so the two frameworks never
share the accelerator's memory or libraries and a torch failure cannot cost llmjax's rows.
MFU = achieved model FLOP/s (llmjax.metrics: 6 N + 12 L H Q T per token) / the chip's
dense bf16 peak (llmjax.metrics.PEAK_FLOPS, or `--peak-tflops`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import jax, np, table

SKIP_TORCH = 3  # the --torch-child exit status when there is no baseline to time
TINY = dict(num_layers=2, d_model=128, num_heads=4, d_ff=512, max_len=128, vocab_size=1024)


def llmjax_config(args, attention: str):
    from llmjax.config import from_dict
    model = {"preset": "gpt2-small", "vocab_size": args.vocab, "dtype": "bfloat16",
             "param_dtype": "float32", "attention_impl": attention, "remat": args.remat,
             **(TINY if args.tiny else {})}
    return from_dict({
        "model": model, "objective": {"name": "clm"},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "train": {"batch_size": args.batch, "seq_len": args.seq, "steps": 1000,
                  "logits_chunk": args.logits_chunk},
        "optimizer": {"name": "adamw", "learning_rate": 3e-4, "schedule": "constant",
                      "warmup_steps": 0, "weight_decay": 0.1, "grad_clip": 1.0},
    })


def time_llmjax(args, attention: str):
    """(compile s, seconds per step, experiment) of one llmjax variant."""
    from llmjax.train.experiment import build
    cfg = llmjax_config(args, attention)
    exp = build(cfg, devices=jax.devices()[:1])
    state = exp.init_state()
    rng = np.random.default_rng(0)
    batches = [{"tokens": jax.numpy.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)),
                                            jax.numpy.int32),
                "segment_ids": jax.numpy.ones((args.batch, args.seq), jax.numpy.int32)}
               for _ in range(2)]
    step = exp.train_step(list(batches[0]))
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for i in range(args.warmup):
        state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(args.steps):  # no host sync inside the loop
        state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(metrics)
    per_step = (time.perf_counter() - start) / args.steps
    return compile_s, per_step, exp


def time_torch(args, mode: str) -> tuple[float, float]:
    """(compile s, seconds per step) of the same GPT in PyTorch."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = TINY if args.tiny else dict(num_layers=12, d_model=768, num_heads=12, d_ff=3072)
    d, h, L = dims["d_model"], dims["num_heads"], dims["num_layers"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.wi, self.wo = nn.Linear(d, dims["d_ff"]), nn.Linear(dims["d_ff"], d)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(o.transpose(1, 2).reshape(b, s, d))
            return x + self.wo(F.gelu(self.wi(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(args.vocab, d), nn.Embedding(args.seq, d)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.lnf = nn.LayerNorm(d)

        def forward(self, tokens):
            x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
            for block in self.blocks:
                x = block(x)
            logits = self.lnf(x) @ self.wte.weight.t()
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())

    model = GPT().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                            fused=device == "cuda")
    loss_fn = torch.compile(model) if mode == "compile" else model
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return compile_s, (time.perf_counter() - start) / args.steps


def torch_child(args) -> None:
    """--torch-child MODE: time PyTorch alone and print the result as the last line (JSON)."""
    try:
        import torch
    except ImportError:
        print("torch is not installed", file=sys.stderr)
        sys.exit(SKIP_TORCH)
    if not (torch.cuda.is_available() or args.tiny):  # e.g. a TPU VM: not GPT-2 on its host CPU
        print("torch sees no CUDA device", file=sys.stderr)
        sys.exit(SKIP_TORCH)
    compile_s, per_step = time_torch(args, args.torch_child)
    print(json.dumps({"compile_s": compile_s, "per_step": per_step}))


def torch_baseline(args):
    """(name, compile s, s/step) of PyTorch from a child process, eager when compiling fails;
    None when no mode ran. Called before JAX initialises the accelerator."""
    modes = ["compile", "eager"] if args.torch == "compile" else [args.torch]
    for mode in modes:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                                "--torch-child", mode], capture_output=True, text=True)
        if child.returncode == SKIP_TORCH:
            print(f"  no PyTorch baseline: {child.stderr.strip()}", flush=True)
            return None
        if child.returncode == 0:
            result = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"  torch ({mode}): {result['per_step'] * 1000:.1f} ms/step", flush=True)
            return f"torch ({mode})", result["compile_s"], result["per_step"]
        tail = "\n    ".join((child.stderr or child.stdout).strip().splitlines()[-6:])
        print(f"  torch ({mode}): failed (exit {child.returncode}):\n    {tail}", flush=True)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=None,
                    help="llmjax model.attention_impl values to time (default: the backend's)")
    ap.add_argument("--remat", default="none", choices=["none", "dots", "dots_no_batch", "full"])
    ap.add_argument("--logits-chunk", type=int, default=0,
                    help="train.logits_chunk (LM head + loss over chunks of positions; 0: whole)")
    ap.add_argument("--torch", default="compile", choices=["compile", "eager", "none"])
    ap.add_argument("--torch-child", choices=["compile", "eager"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="dense bf16 peak of one chip (default: llmjax.metrics.PEAK_FLOPS)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer d128 model (CPU check)")
    args = ap.parse_args()
    if args.tiny:
        args.seq, args.vocab = min(args.seq, TINY["max_len"]), TINY["vocab_size"]
    if args.torch_child:
        return torch_child(args)
    torch_row = torch_baseline(args) if args.torch != "none" else None
    if args.variants is None:
        extra = {"gpu": ["cudnn"], "tpu": ["splash"]}.get(jax.default_backend(), [])
        args.variants = ["xla"] + extra

    from llmjax.metrics import flops_per_token, peak_flops
    from llmjax.models.api import param_count
    device = jax.devices()[0]
    peak = peak_flops(args.peak_tflops * 1e12)
    peak = peak / jax.device_count() if peak else None  # one chip runs the step
    print(f"device: {device.device_kind} ({jax.default_backend()}); peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s bf16; batch {args.batch} x "
          f"seq {args.seq}, remat {args.remat}, logits_chunk {args.logits_chunk}", flush=True)

    rows, flops = [], None
    for attention in args.variants:
        try:
            compile_s, per_step, exp = time_llmjax(args, attention)
        except Exception as err:  # e.g. cudnn attention on a backend without it
            print(f"llmjax attention={attention}: failed: {type(err).__name__}: {err}")
            continue
        abstract = exp.abstract_state()
        params = param_count({"params": abstract.params, "frozen": abstract.frozen})
        flops = flops_per_token(exp.model_config, params, args.seq) * args.batch * args.seq
        rows.append((f"llmjax attention={attention}", compile_s, per_step))
        print(f"  {rows[-1][0]}: {per_step * 1000:.1f} ms/step", flush=True)
    if torch_row:
        rows.append(torch_row)
    if not rows or flops is None:
        return
    torch_time = next((t for name, _, t in rows if name.startswith("torch")), None)
    out = [("variant", "compile+1st s", "step ms", "tokens/s", "TFLOP/s", "MFU", "vs torch")]
    for name, compile_s, per_step in rows:
        achieved = flops / per_step
        out.append((name, f"{compile_s:.1f}", f"{per_step * 1000:.1f}",
                    f"{args.batch * args.seq / per_step:,.0f}", f"{achieved / 1e12:.1f}",
                    f"{achieved / peak:.1%}" if peak else "-",
                    f"{torch_time / per_step:.2f}x" if torch_time else "-"))
    print(table(out[0], out[1:]))


if __name__ == "__main__":
    main()
