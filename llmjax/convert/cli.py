"""`llmjax convert hf-to-llmjax | llmjax-to-hf | gguf-to-llmjax | llmjax-to-gguf SRC OUT`."""
from __future__ import annotations

import argparse
from pathlib import Path

from llmjax import paths
from llmjax.config import ConfigError


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `convert` and its three directions."""
    convert = subparsers.add_parser("convert", help="import/export Hugging Face and GGUF models")
    commands = convert.add_subparsers(dest="convert_command", required=True)
    for name, help_, handler in [
            ("hf-to-llmjax", "HF safetensors directory -> llmjax export (for train.init_from)",
             hf_to_llmjax),
            ("llmjax-to-hf", "llmjax export -> HF directory (config.json + safetensors)",
             llmjax_to_hf),
            ("gguf-to-llmjax", "LLaMA-architecture GGUF file -> llmjax export (dequantised)",
             gguf_to_llmjax),
            ("llmjax-to-gguf", "llmjax export (LLaMA / Mixtral-style) -> GGUF file for "
             "llama.cpp", llmjax_to_gguf)]:
        p = commands.add_parser(name, help=help_)
        p.add_argument("src", metavar="SRC")
        p.add_argument("out", metavar="OUT")
        if name == "llmjax-to-gguf":
            p.add_argument("--dtype", default="f32", choices=("f32", "f16"),
                           help="weight type of the matrices (norms and routers stay f32)")
        elif name != "llmjax-to-hf":
            p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                           help="compute dtype recorded in the config (params stay fp32)")
        else:
            p.add_argument("--dtype", default="float32",
                           choices=("float32", "bfloat16", "float16"),
                           help="dtype of the written weights (default float32)")
            p.add_argument("--max-shard-size", default="5GB",
                           help="split the weights into shards of at most this size, with "
                                "model.safetensors.index.json (default 5GB, as transformers)")
        p.add_argument("--force", action="store_true",
                       help="replace an earlier export of the same kind in OUT (a training "
                            "run's directory is never written into; llmjax-to-gguf: an "
                            "existing OUT file)")
        p.set_defaults(handler=handler)


def _report(model, out: Path) -> int:
    from llmjax.models import param_count

    cfg = model.config
    print(f"wrote {out}: {cfg.family} {cfg.architecture}, {cfg.num_layers} layers, d_model "
          f"{cfg.d_model}, vocab {cfg.vocab_size}, {param_count(model.params):,} parameters"
          f"{', tokenizer' if model.tokenizer is not None else ''}")
    return 0


def _import(args: argparse.Namespace):
    """Load SRC for an llmjax export into OUT, after checking OUT may be written."""
    from llmjax.outdir import check_output_dir
    from llmjax.pretrained import from_pretrained

    # Before a possibly long load; model.save checks again and removes an earlier export.
    check_output_dir(args.out, "llmjax", args.force)
    if Path(args.src).suffix == ".gguf":  # converting is explicit: no second copy in the cache
        from llmjax.convert.gguf_cache import load_gguf

        model = load_gguf(paths.local_copy(args.src, "SRC"), cache=False, dtype=args.dtype)
    else:
        model = from_pretrained(args.src, dtype=args.dtype)
    return model


def hf_to_llmjax(args: argparse.Namespace) -> int:
    if not paths.resolve(args.src, "SRC").joinpath("config.json").exists():
        raise ConfigError(f"{args.src}: no config.json (not a Hugging Face model directory)")
    model = _import(args)
    return _report(model, model.save(args.out, force=args.force))


def gguf_to_llmjax(args: argparse.Namespace) -> int:
    if Path(args.src).suffix != ".gguf":
        raise ConfigError(f"{args.src}: expected a .gguf file")
    model = _import(args)
    return _report(model, model.save(args.out, force=args.force))


def llmjax_to_hf(args: argparse.Namespace) -> int:
    from llmjax.outdir import check_output_dir, remove_export
    from llmjax.pretrained import from_pretrained

    if not paths.resolve(args.src, "SRC").joinpath("config.yaml").exists():
        raise ConfigError(f"{args.src}: no config.yaml (not an llmjax export)")
    check_output_dir(args.out, "hf", args.force)
    model = from_pretrained(args.src)
    remove_export(args.out, "hf")
    out = model.save_hf(args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    weights = sorted(p.name for p in out.glob("model*.safetensors"))
    print(f"wrote {out}: config.json, {', '.join(weights[:3])}"
          f"{f' ... ({len(weights)} shards + index)' if len(weights) > 3 else ''} ({args.dtype})")
    return 0


def llmjax_to_gguf(args: argparse.Namespace) -> int:
    from llmjax.convert.gguf_export import export_gguf
    from llmjax.pretrained import from_pretrained

    if not paths.resolve(args.src, "SRC").joinpath("config.yaml").exists():
        raise ConfigError(f"{args.src}: no config.yaml (not an llmjax export)")
    if Path(args.out).suffix != ".gguf":
        raise ConfigError(f"{args.out}: the output file must end in .gguf")
    if Path(args.out).exists() and not args.force:
        raise ConfigError(f"{args.out} exists: pass --force to replace it")
    model = from_pretrained(args.src)
    file = getattr(model.tokenizer, "path", None)  # an HF tokenizer.json: written if BPE
    out = export_gguf(args.out, model.config, model.params, dtype=args.dtype,
                      tokenizer_dir=file.parent if file is not None else None,
                      special_ids=dict(model.tokenizer.special_ids) if file is not None else None,
                      force=args.force)
    cfg = model.config
    print(f"wrote {out}: llama architecture, {cfg.num_layers} layers"
          f"{f', {cfg.num_experts} experts (top-{cfg.experts_per_token})' if cfg.num_experts else ''}"
          f", {args.dtype}")
    return 0
