"""`llmjax eval-tasks RUN_OR_MODEL --tasks ...`: lm-evaluation-harness tasks through llmjax."""
from __future__ import annotations

import argparse


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-tasks", help="score lm-evaluation-harness tasks (needs the [eval] extra)",
        description="Run lm-evaluation-harness tasks on a training run, llmjax export, HF "
                    "directory or GGUF file. A task is a YAML file in lm-eval's format (local "
                    "data_files are read next to it, offline), a bundled task (tiny_mc, "
                    "tiny_cloze, tiny_gen) or an lm-eval task name.")
    p.add_argument("model", help="training run dir, llmjax export, HF directory or .gguf file")
    p.add_argument("--tasks", nargs="+", required=True, help="task YAML files or names")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-rows", type=int, default=8,
                   help="packed rows per scoring pass (requests share rows)")
    p.add_argument("--max-len", type=int, default=None,
                   help="context window to score with (default: the model's max_len)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from llmjax.config import ConfigError

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be a positive number of items")
    if args.batch_rows < 1:
        raise ConfigError(f"--batch-rows {args.batch_rows}: must be >= 1")
    try:
        from llmjax.evaluation import harness
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    tasks = [harness.load_task(t) for t in args.tasks]  # missing files fail before loading
    overrides = {"max_len": args.max_len} if args.max_len else {}
    lm = harness.LlmjaxLM(args.model, batch_rows=args.batch_rows, **overrides)
    results = harness.evaluate_tasks(lm, tasks, limit=args.limit, num_fewshot=args.num_fewshot)
    print(harness.format_results(results))
    if args.output:
        Path(args.output).write_text(json.dumps(harness.plain_results(results), indent=2) + "\n")
    return 0
