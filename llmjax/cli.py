"""The `llmjax` command: a thin layer over configs and library calls.

    llmjax train CONFIG [section.key=value ...]
    llmjax finetune CONFIG init_from=PATH [section.key=value ...]
    llmjax eval CONFIG [...]      llmjax plan CONFIG [...]      llmjax models
    llmjax demo                   (README's main job: a tiny pretraining on Shakespeare)
    llmjax tokenizer ... | data ... | convert ... | peft ... | generate ...
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from llmjax.config import ConfigError

# Subcommand groups owned by other packages: module with add_subcommands(subparsers).
_GROUPS = ("llmjax.data.cli", "llmjax.convert.cli", "llmjax.peft.cli", "llmjax.generate_cli")


def _overrides(values: Sequence[str]) -> list[str]:
    """`init_from=PATH` is shorthand for `train.init_from=PATH`."""
    out = []
    for value in values:
        key = value.split("=", 1)[0]
        out.append(f"train.{value}" if key == "init_from" else value)
    return out


def _load(args) -> "Config":  # noqa: F821
    from llmjax import config
    cfg = config.load(args.config, _overrides(args.overrides))
    if getattr(args, "require_init", False) and not cfg.train.init_from:
        raise ConfigError("finetune needs init_from=PATH (a checkpoint or parameter export)")
    return cfg


def cmd_train(args) -> int:
    from llmjax.parallel import initialize_distributed
    initialize_distributed()  # multi-host (TPU pods, LLMJAX_COORDINATOR): before any device use
    from llmjax.compile_cache import enable_from_config
    from llmjax.train.trainer import train
    cfg = _load(args)
    enable_from_config(cfg)
    result = train(cfg)
    _print_result(result)
    return getattr(result, "exit_code", 0)


def _print_result(result) -> None:
    ev = result.eval_metrics
    if ev:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in ev.items())
        print(f"step {result.step}: validation {shown}")
    print(f"run directory: {result.run_dir}")


def cmd_eval(args) -> int:
    """A run's validation metrics. Classifiers (objective classification on labelled files, a
    run directory, or --data FILE) are scored on every row: accuracy, per-class precision /
    recall / F1 and confusion counts."""
    from pathlib import Path
    if Path(args.config).is_dir():  # llmjax eval RUN_DIR --data FILE
        if args.overrides:
            raise ConfigError(f"overrides {args.overrides} need a config file; with a run directory "
                              f"pass only --data FILE")
        return _eval_classifier(Path(args.config), args.data, None)
    cfg = _load(args)
    if cfg.objective.name == "classification" and (cfg.data.source == "labelled" or args.data):
        return _eval_classifier(Path(cfg.train.run_dir), args.data, cfg.data)
    if args.data:
        raise ConfigError(f"--data scores classifiers on labelled files; objective "
                          f"{cfg.objective.name!r} evaluates data.validation_* of the config instead")
    from llmjax.train.trainer import evaluate_run
    metrics = evaluate_run(cfg)
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _eval_classifier(run_dir, files, data) -> int:
    """Classify every row of labelled `files` (default: data.validation_files) with the run."""
    import yaml
    from llmjax.classify import evaluate_files
    from llmjax.config import _build
    from llmjax.data.config import DataConfig
    from llmjax.pretrained import from_pretrained
    if not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{run_dir} holds no checkpoints to evaluate; train first or point "
                                f"at a run directory")
    if data is None:  # the columns the run was trained with
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        data = _build(DataConfig, saved.get("data", {}), "data")
    key = "--data" if files else "data.validation_files"
    files = files or data.validation_files
    if not files:
        raise ConfigError("no labelled file to evaluate: pass --data FILE (CSV / TSV / JSONL) or set "
                          "data.validation_files")
    model = from_pretrained(run_dir)
    if data.label_names and list(model.label_names) != list(data.label_names):
        raise ConfigError(f"{run_dir} was trained with labels {list(model.label_names) or 'unknown'}, the "
                          f"config names {list(data.label_names)}; evaluate with the run's config "
                          f"(llmjax eval {run_dir} --data FILE)")
    report = evaluate_files(model, data, files, key=key)
    print(f"{run_dir} on {', '.join(files)}")
    print(report.format())
    return 0


def cmd_models(args) -> int:
    from llmjax.config import model_config, preset_names
    from llmjax.models import abstract_params, param_count
    rows = []
    for name in preset_names():
        cfg = model_config(name)
        rows.append((name, cfg.family, cfg.architecture, cfg.num_layers, cfg.d_model,
                     cfg.num_heads, cfg.kv_heads, param_count(abstract_params(cfg))))
    header = ("preset", "family", "architecture", "layers", "d_model", "heads", "kv", "parameters")
    table = [header] + [tuple(str(c) for c in r[:7]) + (f"{r[7]:,}",) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
    return 0


def cmd_plan(args) -> int:
    """Print the mesh, each parameter's sharding and per-device memory, without allocating."""
    import jax
    import numpy as np
    from llmjax.train.experiment import build
    from llmjax.data.tokenizer import SpecialTokens
    cfg = _load(args)
    # Shapes only: the attention kernel changes no parameter, and cuDNN's cannot trace off a GPU.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl="xla"))
    exp = build(cfg, special=SpecialTokens())  # planning needs no tokenizer files
    abstract = exp.abstract_state()
    sh = exp.state_shardings(abstract)
    print(f"mesh {dict(exp.mesh.shape)} over {len(exp.mesh.devices.flat)} devices")
    total = 0
    for (path, leaf), (_, s) in zip(jax.tree_util.tree_flatten_with_path(abstract.params)[0],
                                    jax.tree_util.tree_flatten_with_path(sh.params)[0]):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        shard = s.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * leaf.dtype.itemsize
        print(f"  {name:60s} {str(leaf.shape):22s} {str(s.spec):40s}")
    opt = sum(int(np.prod(s.shard_shape(l.shape))) * l.dtype.itemsize for l, s in zip(
        jax.tree.leaves(abstract.opt_state), jax.tree.leaves(sh.opt_state)))
    print(f"per device: params {total / 2**20:,.1f} MiB, optimizer state {opt / 2**20:,.1f} MiB")
    return 0


def cmd_demo(args) -> int:
    from llmjax.demo import run_demo
    return run_demo(args.cache, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmjax", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--cpu-devices", type=int, default=0, metavar="N",
                        help="emulate N CPU devices (test meshes on a laptop)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, fn, help_text: str, **defaults):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config (configs/experiments/...)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides")
        p.set_defaults(handler=fn, **defaults)
        return p

    with_config("train", cmd_train, "pretrain or fine-tune from a config")
    with_config("finetune", cmd_train, "fine-tune: train with init_from=PATH", require_init=True)
    p = with_config("eval", cmd_eval, "evaluate the latest checkpoint of a run (CONFIG or, for "
                    "classifiers, RUN_DIR)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="labelled CSV / TSV / JSONL files to score a classifier on")
    with_config("plan", cmd_plan, "show mesh, shardings and memory per device")
    p = sub.add_parser("models", help="table of model presets with exact parameter counts")
    p.set_defaults(handler=cmd_models)
    p = sub.add_parser("demo", help="tiny GPT pretraining on Shakespeare (README's main job)")
    p.add_argument("--cache", default="~/.cache/llmjax", help="where corpus/tokenizer/data go")
    p.add_argument("--steps", type=int, default=600)
    p.set_defaults(handler=cmd_demo)
    for module in _GROUPS:
        try:
            importlib.import_module(module).add_subcommands(sub)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return parser


def _hoist_global_options(argv: list[str]) -> list[str]:
    """Accept `--cpu-devices N` / `-v` after the subcommand too (they must act before jax starts)."""
    front, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--cpu-devices" and i + 1 < len(argv):
            front += argv[i:i + 2]
            i += 2
            continue
        if argv[i].startswith("--cpu-devices=") or argv[i] in ("-v", "--verbose"):
            front.append(argv[i])
        else:
            rest.append(argv[i])
        i += 1
    return front + rest


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = _hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if args.cpu_devices:  # must precede the first jax backend initialisation
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llmjax").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, FileNotFoundError) as err:
        print(f"llmjax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
