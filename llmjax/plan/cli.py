"""The --target / --sweep / --save-hlo options of `llmjax plan` (kept light: argparse only
at import; jax and libtpu load when a plan runs)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, metavar="TOPOLOGY",
                   help="compile for a Cloud TPU slice (v5e-256, v5litepod-16, v4-32, v5p-128, "
                        "v6e-256, v5e:4x4, v4:2x2x1) with libtpu, no TPU needed "
                        "(pip install 'llmjax[tpu]')")
    p.add_argument("--slices", type=int, default=1, metavar="N",
                   help="N such slices joined over DCN (mesh.dcn_data=N)")
    p.add_argument("--sweep", action="store_true",
                   help="rank mesh factorisations x remat x per-chip batch by estimated tokens/s")
    p.add_argument("--max-configs", type=int, default=12, metavar="N",
                   help="compile at most N sweep candidates (default 12)")
    p.add_argument("--best-out", default="plan-best.yaml", metavar="YAML",
                   help="where --sweep writes the best configuration (default plan-best.yaml)")
    p.add_argument("--no-decode", action="store_true",
                   help="leave out the KV-cache decode (prefill + one decode step), which "
                        "--target compiles by default for models that generate")
    p.add_argument("--decode-batch", type=int, default=None, metavar="N",
                   help="sequences decoded together (default: one per batch shard of the mesh)")
    p.add_argument("--decode-len", type=int, default=None, metavar="T",
                   help="KV-cache length, prompt + generated tokens (default train.seq_len)")
    p.add_argument("--decode-prompt", type=int, default=None, metavar="P",
                   help="prefill length (default half of --decode-len)")
    p.add_argument("--save-hlo", default=None, metavar="DIR",
                   help="write each compiled step's optimized HLO to DIR")


def run(args, cfg) -> int:
    import os
    # A plan compiles from topology descriptions and never runs on an accelerator: skip
    # jax's TPU probe (+2 s with libtpu installed) unless the user chose platforms.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from llmjax.config import ConfigError
    from llmjax.plan import aot, topology
    target = topology.parse(args.target, args.slices)
    aot.require_libtpu()
    if args.sweep:
        from llmjax.plan import sweep
        if args.max_configs < 1:
            raise ConfigError(f"--max-configs {args.max_configs} must be >= 1")
        print(f"sweeping {target.describe()} (at most {args.max_configs} compiles)",
              file=sys.stderr)
        rows = sweep.sweep(args.config, _overrides(args), target, args.max_configs)
        print(sweep.format_table(rows))
        best = sweep.ranked(rows)
        if best:
            out = sweep.write_best(args.config, _overrides(args), target, best[0], args.best_out)
            print(f"best configuration written to {out} (llmjax train {out})")
        return 0
    for flag in ("decode_batch", "decode_len", "decode_prompt"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {value} must be >= 1")
    decode = None
    if not args.no_decode and cfg.model.architecture != "encoder":
        decode = {"batch": args.decode_batch, "context": args.decode_len,
                  "prompt": args.decode_prompt}
    result = aot.plan(cfg, target, save_hlo=args.save_hlo, decode=decode)
    from llmjax.plan.report import format_plan
    print(format_plan(result))
    if args.save_hlo and result.steps:
        print(f"optimized HLO written to {args.save_hlo}/")
    return 0


def _overrides(args) -> list[str]:
    from llmjax.cli import _overrides
    return _overrides(args.overrides)
