"""The `llmjax` command: a thin layer over configs and library calls.

    llmjax train CONFIG [section.key=value ...]
    llmjax finetune CONFIG init_from=PATH [section.key=value ...]
    llmjax eval CONFIG [...]      llmjax plan CONFIG [...]      llmjax models
    llmjax demo                   (README's main job: a tiny pretraining on Shakespeare)
    llmjax plot RUN_DIR [RUN_DIR ...]
    llmjax tokenizer ... | data ... | convert ... | peft ... | generate ...
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import re
import sys
from typing import Optional, Sequence

from llmjax import console
from llmjax.config import ConfigError

# Subcommand groups owned by other packages: module with add_subcommands(subparsers).
_GROUPS = ("llmjax.data.cli", "llmjax.convert.cli", "llmjax.peft.cli", "llmjax.generate_cli",
           "llmjax.export_cli", "llmjax.launch.cli", "llmjax.evaluation.cli")


def _overrides(values: Sequence[str]) -> list[str]:
    """`init_from=PATH` is shorthand for `train.init_from=PATH`."""
    out = []
    for value in values:
        key = value.split("=", 1)[0]
        out.append(f"train.{value}" if key == "init_from" else value)
    return out


def _load(args) -> "Config":  # noqa: F821
    from llmjax import config
    from llmjax.errors import MissingInputError
    try:
        cfg = config.load(args.config, _overrides(args.overrides))
    except MissingInputError as err:  # found while validating: say how the config makes it
        from llmjax.train.preflight import setup_hint
        raise MissingInputError(f"{err}{setup_hint(args.config)}") from None
    from llmjax.peft.plan import check as check_peft
    check_peft(cfg.peft)  # method names against the registry (the config layer has none)
    if getattr(args, "require_init", False) and not cfg.train.init_from:
        raise ConfigError("finetune needs init_from=PATH (a checkpoint or parameter export)")
    if getattr(args, "check_inputs", True):
        from llmjax.train.preflight import check_inputs
        check_inputs(cfg, args.config)
    return cfg


def _quiet_data(cfg) -> None:
    if cfg.data.source != "synthetic":  # TFDS builds or reads the data
        console.quiet_tfds()


def cmd_train(args) -> int:
    from llmjax.parallel import initialize_distributed
    # Multi-host (TPU pods, JAX_COORDINATOR_ADDRESS): before any device use. docs/multihost.md
    if not initialize_distributed():
        return _train(args)
    try:
        return _train(args)
    except BaseException as err:  # noqa: BLE001 - one host failing alone must not hang the rest
        _leave_multihost(err, args)
        raise


def _train(args) -> int:
    from llmjax.compile_cache import enable_from_config
    from llmjax.distributed import check_same_program
    from llmjax.train.trainer import train
    cfg = _load(args)
    check_same_program(cfg.to_dict())  # every host: same config, code and packages (else exit 2)
    _quiet_data(cfg)
    enable_from_config(cfg)
    result = train(cfg)
    _print_result(result)
    return getattr(result, "exit_code", 0)


def _leave_multihost(err: BaseException, args) -> None:
    """A multi-process run that fails on this host: report it and exit now. jax's exit path
    would wait at a shutdown barrier for peers that may be blocked in a collective waiting for
    this host; exiting at once makes their collectives fail and them exit too."""
    from llmjax import distributed
    if isinstance(err, SystemExit):
        return
    if getattr(args, "debug", False) or os.environ.get("LLMJAX_DEBUG", "") not in ("", "0"):
        import traceback
        traceback.print_exception(err)
    message, code = _classify(err)
    distributed.leave(message, code)


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
    _quiet_data(cfg)
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
    from llmjax.config import section_from_dict
    from llmjax.data.config import DataConfig
    from llmjax.pretrained import from_pretrained
    if not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{run_dir} holds no checkpoints to evaluate; train first or point "
                                f"at a run directory")
    if data is None:  # the columns the run was trained with
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        data = section_from_dict(DataConfig, saved.get("data", {}), "data")
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
    from llmjax.models.moe import inactive_params
    rows = []
    for name in preset_names():
        cfg = model_config(name)
        total = param_count(abstract_params(cfg))
        rows.append((name, cfg.family, cfg.architecture, cfg.num_layers, cfg.d_model,
                     cfg.num_heads, cfg.kv_heads, total, total - inactive_params(cfg)))
    header = ("preset", "family", "architecture", "layers", "d_model", "heads", "kv", "parameters",
              "active")  # active: per token (MoE: the routed experts only)
    table = [header] + [tuple(str(c) for c in r[:7]) + (f"{r[7]:,}", f"{r[8]:,}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
    return 0


def cmd_plan(args) -> int:
    """Print the mesh, each parameter's sharding and per-device memory, without allocating;
    with --target, compile the steps for a Cloud TPU slice (llmjax/plan/)."""
    if args.target:
        from llmjax.plan.cli import run
        return run(args, _load(args))
    import jax
    import numpy as np
    from llmjax.train.experiment import build
    from llmjax.data.tokenizer import SpecialTokens
    from llmjax.tree import flatten
    cfg = _load(args)
    # Shapes only: the attention kernel changes no parameter, and cuDNN's cannot trace off a GPU.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl="xla"))
    exp = build(cfg, special=SpecialTokens())  # planning needs no tokenizer files
    abstract = exp.abstract_state()
    sh = exp.state_shardings(abstract)
    print(f"mesh {dict(exp.mesh.shape)} over {len(exp.mesh.devices.flat)} devices")
    total = 0
    shardings = flatten(sh.params)
    for name, leaf in flatten(abstract.params).items():
        s = shardings[name]
        shard = s.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * leaf.dtype.itemsize
        print(f"  {name:60s} {str(leaf.shape):22s} {str(s.spec):40s}")
    opt = sum(int(np.prod(s.shard_shape(l.shape))) * l.dtype.itemsize for l, s in zip(
        jax.tree.leaves(abstract.opt_state), jax.tree.leaves(sh.opt_state)))
    print(f"per device: params {total / 2**20:,.1f} MiB, optimizer state {opt / 2**20:,.1f} MiB")
    return 0


def cmd_demo(args) -> int:
    from llmjax.demo import run_demo
    return run_demo(args.cache, steps=args.steps, overrides=args.overrides)


def cmd_plot(args) -> int:
    from llmjax.plot import plot_runs
    out = plot_runs(args.run_dirs, args.out)
    print(f"wrote {out}")
    return 0


# One example per command, shown by `llmjax COMMAND --help`. tests/test_docs_commands.py runs
# each (after the documented commands, whose runs and files they use). A group's own module may
# set `epilog=` instead (it wins over this table).
EXAMPLES = {
    "train": "llmjax train configs/experiments/gpt-tiny.yaml train.steps=100 "
             "optimizer.learning_rate=1e-3",
    "finetune": "llmjax finetune configs/experiments/peft-lora.yaml init_from=runs/gpt-tiny",
    "eval": "llmjax eval configs/experiments/gpt-tiny.yaml",
    "plan": "llmjax --cpu-devices 8 plan configs/experiments/llama-tiny.yaml model=llama2-7b "
            "mesh.data=1 mesh.fsdp=8 mesh.tensor=1",
    "models": "llmjax models",
    "demo": "llmjax demo --steps 300",
    "plot": "llmjax plot runs/gpt-tiny runs/gpt-tiny-peft-lora --out curves.png",
    "tokenizer train": "llmjax tokenizer train --input shakespeare/shakespeare_texts/train/*.txt "
                       "--vocab-size 4096 --out tok",
    "data prepare": "llmjax data prepare --paths 'shakespeare/shakespeare_texts/train/*.txt' "
                    "--validation-fraction 0.05 --data-dir data --tokenizer tok",
    "data corpus": "llmjax data corpus shakespeare --cache shakespeare",
    "convert hf-to-llmjax": "llmjax convert hf-to-llmjax hf/own-text exports/own-text",
    "convert llmjax-to-hf": "llmjax convert llmjax-to-hf runs/own-text hf/own-text",
    "convert gguf-to-llmjax": "llmjax convert gguf-to-llmjax model.gguf exports/model",
    "convert llmjax-to-gguf": "llmjax convert llmjax-to-gguf runs/llama-tiny llama-tiny.gguf",
    "peft merge": "llmjax peft merge runs/gpt-tiny-peft-lora/adapter exports/merged",
    "export": "llmjax export runs/gpt-tiny-peft-lora exports/lora-merged",
    "peft summary": "llmjax peft summary configs/experiments/peft-lora.yaml peft.rank=4",
    "generate": "llmjax generate runs/own-text --prompt 'ROMEO.' --max-new-tokens 60",
    "eval-tasks": "llmjax eval-tasks runs/own-text --tasks tiny_mc --limit 4",
    "launch tpu-vm": "llmjax launch tpu-vm configs/experiments/llama2-7b-c4.yaml --tpu v5p-128 "
                     "--zone us-east5-a --spot --bucket gs://b/runs/7b --dry-run",
    "launch gke": "llmjax launch gke configs/experiments/llama2-7b-c4.yaml --tpu v5p-128 "
                  "--slices 2 --image IMAGE --bucket gs://b/runs/7b --dry-run",
    "launch slurm": "llmjax launch slurm configs/experiments/gpt-tiny.yaml --nodes 2 --dry-run",
}

MAIN_EPILOG = """\
examples:
  llmjax demo                                        # the README's main job, on CPU
  llmjax train configs/experiments/gpt-tiny.yaml train.steps=100
  llmjax COMMAND --help                              # each command's options and an example

Errors are one line on stderr (exit 2 for a problem with the input, 1 for a bug);
--debug or LLMJAX_DEBUG=1 shows the traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with llmjax's one-line error convention (see `main`)."""

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:  # argparse's list, plus the nearest name
            options = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), options, n=1)
            message += f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"{message} (`{self.prog} --help` lists what it takes)")


class UsageError(ConfigError):
    """Bad command-line arguments."""


def _positive(what: str):
    """argparse type: an int >= 1, else a message naming `what`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be a positive number of {what}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmjax", description=__doc__.split("\n")[0], epilog=MAIN_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, third-party libraries' notices included")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks (also LLMJAX_DEBUG=1)")
    parser.add_argument("--cpu-devices", type=_positive("devices"), default=None, metavar="N",
                        help="emulate N CPU devices (test meshes on a laptop)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, fn, help_text: str, **defaults):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="YAML config (configs/experiments/...)")
        p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                       help="overrides, e.g. train.steps=100 (docs/config.md lists every key)")
        p.set_defaults(handler=fn, **defaults)
        return p

    with_config("train", cmd_train, "pretrain or fine-tune from a config")
    with_config("finetune", cmd_train, "fine-tune: train with init_from=PATH", require_init=True)
    p = with_config("eval", cmd_eval, "evaluate the latest checkpoint of a run (CONFIG or, for "
                    "classifiers, RUN_DIR)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="labelled CSV / TSV / JSONL files to score a classifier on")
    p = with_config("plan", cmd_plan, "show mesh, shardings and memory per device; with "
                    "--target, compile for a Cloud TPU slice", check_inputs=False)  # no data
    from llmjax.plan.cli import add_arguments as add_plan_arguments
    add_plan_arguments(p)
    p = sub.add_parser("models", help="table of model presets with exact parameter counts")
    p.set_defaults(handler=cmd_models)
    p = sub.add_parser("demo", help="tiny GPT pretraining on Shakespeare (README's main job)",
                       description="Fetch Shakespeare's plays, train a BPE tokenizer, pretrain a "
                                   "4-layer GPT,\nprint the validation loss and a sample. Settings: "
                                   "configs/experiments/demo-shakespeare.yaml.")
    p.add_argument("--cache", default="~/.cache/llmjax", help="where corpus/tokenizer/data go")
    p.add_argument("--steps", type=_positive("steps"), default=None,
                   help="training steps (default: the config's 600)")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                   help="overrides of configs/experiments/demo-shakespeare.yaml")
    p.set_defaults(handler=cmd_demo)
    p = sub.add_parser("plot", help="PNG curves (loss, eval loss, learning rate, tokens/s) "
                                    "of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to overlay")
    p.add_argument("--out", default=None, metavar="PNG",
                   help="image to write (default RUN_DIR/curves.png of the first run)")
    p.set_defaults(handler=cmd_plot)
    for module in _GROUPS:
        try:
            importlib.import_module(module).add_subcommands(sub)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    _add_examples(parser)
    return parser


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    """(command path, parser) of every runnable command, e.g. (("data", "prepare"), p)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    seen = set()
    for name, child in subs[0].choices.items():
        if id(child) not in seen:  # aliases share a parser
            seen.add(id(child))
            yield from leaf_parsers(child, path + (name,))


def _add_examples(parser: argparse.ArgumentParser) -> None:
    """Each command's epilog: its example; a group's (`llmjax data --help`): its commands'."""
    groups: dict[str, list[str]] = {}
    for path, p in leaf_parsers(parser):
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        if not p.epilog and " ".join(path) in EXAMPLES:
            p.epilog = f"example:\n  {EXAMPLES[' '.join(path)]}"
        if len(path) > 1 and p.epilog:
            groups.setdefault(path[0], []).append(p.epilog.split("\n", 1)[-1])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, lines in groups.items():
        group = sub.choices[name]
        group.formatter_class = argparse.RawDescriptionHelpFormatter
        group.epilog = group.epilog or "examples:\n" + "\n".join(lines)


def _hoist_global_options(argv: list[str]) -> list[str]:
    """Accept `--cpu-devices N`, `-v`, `--debug` after the subcommand too (they act before jax
    starts)."""
    front, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--cpu-devices" and i + 1 < len(argv):
            front += argv[i:i + 2]
            i += 2
            continue
        if argv[i].startswith("--cpu-devices=") or argv[i] in ("-v", "--verbose", "--debug"):
            front.append(argv[i])
        else:
            rest.append(argv[i])
        i += 1
    return front + rest


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. Every failure is one `llmjax: error: ...` line on stderr: exit 2 for
    input the user can fix, 130 for Ctrl-C, 1 for a bug; --debug re-raises (traceback)."""
    code = _main(argv)
    if code not in (0, None) and argv is None and not _debug(sys.argv[1:]):
        _quiet_shutdown()
    return code


def _debug(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("LLMJAX_DEBUG", "") not in ("", "0")


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = _hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    debug = _debug(argv)
    try:
        args = build_parser().parse_args(argv)
        if args.cpu_devices:  # must precede the first jax backend initialisation
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={args.cpu_devices}")
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        console.quiet_logging(verbose=args.verbose, debug=debug)
        return int(args.handler(args) or 0)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0  # --help, or a handler's own exit status
        return _report(str(exit_.code), 2)
    except KeyboardInterrupt:
        if debug:
            raise
        return _report("interrupted", 130)
    except Exception as err:  # noqa: BLE001 - the one place errors become exit codes
        if debug:
            raise
        return _report(*_classify(err))


def _classify(err: BaseException) -> tuple[str, int]:
    """(one-line message, exit code): 2 for input the user can fix, 130 for Ctrl-C, 1 for a
    lost peer host (relaunch) or a bug."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", 130
    from llmjax.distributed import peer_lost_message
    from llmjax.errors import user_message
    message = peer_lost_message(err)  # first: a save that failed as a peer died is not exit 2
    if message is not None:
        return message, 1
    message = user_message(err)
    if message is not None:
        return message, 2
    return (f"internal error: {type(err).__name__}: {err} (rerun with --debug for the "
            f"traceback; please report it)", 1)


def _report(message: str, code: int) -> int:
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"llmjax: error: {line}", file=sys.stderr, flush=True)
    return code


def _quiet_shutdown() -> None:
    """The error line stays the last thing on the terminal: after a failed background save,
    orbax's and gcsfs's asyncio tasks can die with the interpreter ("Exception ignored ...
    Event loop is closed"); that noise says nothing the error line did not (--debug keeps it).
    Only for the program itself (main() without argv), never inside a caller's process."""
    import threading
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda exc: None


if __name__ == "__main__":
    sys.exit(main())
