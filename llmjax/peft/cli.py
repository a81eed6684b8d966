"""`llmjax peft merge` and `llmjax peft summary` (wired into llmjax/cli.py)."""
from __future__ import annotations

import argparse


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `peft merge ADAPTER OUT [--base DIR]` and `peft summary CONFIG [k=v ...]`."""
    peft = subparsers.add_parser("peft", help="parameter-efficient fine-tuning tools")
    commands = peft.add_subparsers(dest="peft_command", required=True)
    merge = commands.add_parser(
        "merge", help="base checkpoint + adapter-only checkpoint -> merged full parameter export")
    merge.add_argument("src", metavar="ADAPTER", help="adapter checkpoint directory (save_adapter)")
    merge.add_argument("out", metavar="OUT", help="directory for the merged parameter export")
    merge.add_argument("--base", default=None, metavar="DIR",
                       help="base: a run directory, checkpoint step directory or parameter "
                            "export (default: the one the adapter records)")
    merge.add_argument("--force", action="store_true", help="replace an earlier export at OUT")
    merge.set_defaults(handler=peft_merge)
    summary = commands.add_parser(
        "summary", help="trainable parameters per method and optimizer-state bytes of a config")
    summary.add_argument("config", metavar="CONFIG", help="experiment YAML file")
    summary.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="dotted overrides, e.g. peft.method=lora peft.rank=4")
    summary.set_defaults(handler=peft_summary)


def peft_merge(args: argparse.Namespace) -> int:
    from llmjax.peft.checkpoint import merge_checkpoint
    out = merge_checkpoint(args.src, args.out, args.base, force=args.force)
    print(f"merged parameters written to {out}")
    return 0


def peft_summary(args: argparse.Namespace) -> int:
    from llmjax.config import load
    print(abstract_summary(load(args.config, args.overrides)))
    return 0


def abstract_summary(config) -> str:
    """The summary of a config's PEFT split, from shapes only (nothing is allocated)."""
    import jax
    import optax  # noqa: F401  (optimizer state shapes)

    from llmjax.models import abstract_params
    from llmjax.peft.plan import build
    from llmjax.peft.report import summary
    from llmjax.train import optim

    plan = build(config.peft)
    cfg = plan.model_config(config.model)
    cfg.validate()
    tx, _ = optim.make_optimizer(config.optimizer, config.train.steps)

    def split(params, rng):
        trainable, frozen = plan.split(params, rng)
        return trainable, frozen, tx.init(trainable)

    trainable, frozen, opt_state = jax.eval_shape(split, abstract_params(cfg, boxed=False),
                                                  jax.random.key(0))
    return summary(trainable, frozen, opt_state, method=config.peft.method)
