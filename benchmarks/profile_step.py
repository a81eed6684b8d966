"""Where the train step's time goes on XLA:CPU: per-thunk times from a profiler trace.

Traces a few steps of the reference GPT with `jax.profiler` (perfetto JSON), sums the time of
every compiled op (fusion, dot, copy) and prints the largest with the shape and JAX op name
from the compiled HLO, plus totals for dot fusions (`ynn_fusion*`) and everything else.
Durations of ops that ran concurrently on the two cores add up, so the op total can exceed
the step time; use it to rank, and `vs_torch.py` to measure.

    python benchmarks/profile_step.py --dtype bfloat16 --top 30
    python benchmarks/profile_step.py --kernels xla --set model.scan_layers=false
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

from common import jax_batch, reference_config, synthetic_tokens

import jax

RUNTIME = ("ThunkExecutor", "$", "SlinkyThreadPool", "while", "PjitFunction", "end:")


def op_times(trace_dir: str, steps: int) -> dict[str, tuple[int, float]]:
    """name -> (calls per step, ms per step) of every compiled op in the trace."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    total = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(RUNTIME):
            total[e["name"]][0] += 1
            total[e["name"]][1] += e["dur"] / 1000
    return {k: (n // steps, ms / steps) for k, (n, ms) in total.items()}


def describe(hlo: str, name: str) -> str:
    """'shape  jax/op/name' of the HLO instruction `name`."""
    line = re.search(r"%" + re.escape(name) + r" = (\S+) .*", hlo)
    if not line:
        return ""
    op = re.search(r'op_name="([^"]*)"', line.group(0))
    return f"{line.group(1)[:40]:40s} {op.group(1)[-80:] if op else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--steps", type=int, default=3, help="traced steps (after 2 warm-up)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                    help="config overrides, e.g. model.scan_layers=false")
    args = ap.parse_args()

    from llmjax.config import apply_override, from_dict
    from llmjax.train.experiment import build
    data = reference_config(args.dtype, kernels=args.kernels).to_dict()
    for override in args.set:
        apply_override(data, override)
    cfg = from_dict(data)
    exp = build(cfg, devices=jax.devices()[:1])
    state = exp.init_state()
    batch = jax_batch(synthetic_tokens(0))
    step = exp.train_step(list(batch))
    hlo = step.lower(state, batch).compile().as_text()
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_ms = (time.perf_counter() - start) / args.steps * 1000

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        ops = op_times(trace_dir, args.steps)

    dots = sum(ms for k, (_, ms) in ops.items() if k.startswith("ynn_fusion"))
    rest = sum(ms for k, (_, ms) in ops.items() if not k.startswith("ynn_fusion"))
    print(f"{args.dtype} kernels={args.kernels} {' '.join(args.set)}: step {step_ms:.0f} ms "
          f"untraced; ops {dots + rest:.0f} ms/step = dot fusions {dots:.0f} + other {rest:.0f}")
    print("| ms/step | calls | op | shape | JAX op |\n|---|---|---|---|---|")
    for name, (calls, ms) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:args.top]:
        shape, _, op = describe(hlo, name).partition(" ")
        print(f"| {ms:.1f} | {calls} | {name} | {shape} | {op.strip()} |")


if __name__ == "__main__":
    main()
