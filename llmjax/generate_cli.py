"""`llmjax generate MODEL --prompt TEXT`: sample from any model from_pretrained can load."""
from __future__ import annotations

import argparse


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a checkpoint, HF directory or GGUF")
    p.add_argument("model", help="llmjax checkpoint / run dir, HF directory or .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmjax.config import ConfigError
    from llmjax.generate import check_sampling
    from llmjax.pretrained import from_pretrained

    # Bad arguments fail before a (possibly large) model is loaded or anything compiles.
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    model = from_pretrained(args.model)
    if model.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer to encode the prompt (set "
                          f"data.tokenizer in the run's config, or use Python with token ids)")
    text = model.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, chat=args.chat)
    print(args.prompt + text)
    return 0
