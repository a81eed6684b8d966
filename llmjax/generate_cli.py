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
    p.add_argument("--stream", action="store_true",
                   help="print each token as it is sampled (reads every token back to the host)")
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
    if args.stream:
        return _stream(model, args)
    text = model.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, chat=args.chat)
    print(args.prompt + text)
    return 0


def _stream(model, args: argparse.Namespace) -> int:
    """Print the prompt, then the continuation as it grows (decoded from all new ids so far,
    so multi-token characters appear whole)."""
    import sys

    from llmjax.generate import generate

    tok = model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat \
        else args.prompt
    special = tok.special_ids
    ends = [e for e in (special.get("eos"),
                        tok.token_to_id("<|im_end|>") if hasattr(tok, "token_to_id") else None)
            if e is not None]
    new: list[int] = []
    shown = ""
    sys.stdout.write(args.prompt)

    def show(ids):
        nonlocal shown
        if ids[0] is None:
            return
        new.append(ids[0])
        text = tok.decode(new)
        sys.stdout.write(text[len(shown):] if text.startswith(shown) else "")
        sys.stdout.flush()
        shown = text

    generate(model.config, model.params, [tok.encode(text)], max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
             eos_id=ends or None, pad_id=special.get("pad", 0) or 0, on_token=show)
    sys.stdout.write("\n")
    return 0
