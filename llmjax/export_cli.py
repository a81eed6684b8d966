"""`llmjax export RUN OUT [--step N] [--adapter-only] [--force]` (wired into llmjax/cli.py)."""
from __future__ import annotations

import argparse


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="a run's checkpoint -> parameter export (PEFT merged) or adapter export")
    p.add_argument("run", metavar="RUN",
                   help="run directory (train.run_dir) or checkpoint step directory")
    p.add_argument("out", metavar="OUT", help="directory for the export")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write only the PEFT adapter (small; `llmjax peft merge` completes it)")
    p.add_argument("--force", action="store_true", help="replace an earlier export at OUT")
    p.set_defaults(handler=export)


def export(args: argparse.Namespace) -> int:
    from llmjax.export import export_run
    out = export_run(args.run, args.out, step=args.step, adapter_only=args.adapter_only,
                     force=args.force)
    print(f"{'adapter' if args.adapter_only else 'parameter'} export written to {out}")
    return 0
