"""Checkpoints on orbax: exported parameter directories (params + config).

A parameter export is a directory with `config.yaml` (the model section, and
optionally the rest of the run config) and `params/` (an orbax PyTree
checkpoint of the plain parameter dict). It is what `init_from`,
`llmjax convert` and `llmjax.from_pretrained` read and write.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
import yaml

from llmjax.config import Config, ConfigError, ModelConfig
from llmjax.tree import flatten, path_str, unflatten
from llmjax.errors import CheckpointError  # noqa: F401 - re-exported: llmjax.checkpoint.CheckpointError


def _config_dict(config: Config | ModelConfig | dict) -> dict:
    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, ModelConfig):
        return {"model": dataclasses.asdict(config)}
    return dict(config)


def save_params(directory: str | os.PathLike, params: Any,
                config: Config | ModelConfig | dict, extra: Optional[dict] = None,
                force: bool = False) -> Path:
    """Write params (sharded or not) and the config; returns the directory.

    `directory` must be new or empty; `force=True` replaces an earlier parameter export there
    (its files are removed first). A training run directory or a directory of other files
    is refused: its config.yaml or files are never overwritten."""
    from llmjax.outdir import check_output_dir, remove_export

    directory = Path(directory).absolute()
    check_output_dir(directory, "llmjax", force, action="save", force_name="force=True")
    if jax.process_count() > 1:  # every process checked before any writes
        multihost_utils.sync_global_devices("llmjax save_params: output checked")
    if jax.process_index() == 0:
        remove_export(directory, "llmjax")  # no stale tokenizer/ or params/ beside the new
    directory.mkdir(parents=True, exist_ok=True)
    data = _config_dict(config)
    if extra:
        data.update(extra)
    if jax.process_index() == 0:
        (directory / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params, force=True)
        checkpointer.wait_until_finished()
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """The config dict stored beside a parameter export or a run's checkpoints."""
    path = Path(directory) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{str(directory)!r} has no config.yaml: not an llmjax checkpoint "
                          f"(convert HF/GGUF models with `llmjax convert`)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: not valid YAML: "
                              f"{' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):  # a list or scalar: not a config llmjax wrote
        raise CheckpointError(f"{path}: expected a YAML mapping of config sections, got "
                              f"{type(data).__name__}")
    return data


def load_params(directory: str | os.PathLike, target: Any = None) -> tuple[Any, dict]:
    """(params, config dict) of a parameter export.

    `target` is a tree of jax.ShapeDtypeStruct (with shardings) to restore onto
    a given mesh layout; without it, arrays come back on the default device.
    """
    directory = Path(directory).absolute()
    config = read_config(directory)
    path = directory / "params"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} is missing: the parameter export is incomplete")
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            meta = checkpointer.metadata(path)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=single), tree)
        params = checkpointer.restore(path, target)
    return params, config


# =============================================================================
# Training checkpoints: orbax CheckpointManager over run_dir/checkpoints.
#
# run_dir/checkpoints/<step>/
#   state/   train state: step, params, frozen, opt_state, rng (key data)  [orbax PyTree, OCDBT]
#   data/    process_<i>.json: data iterator state of process i (one per host)
#   meta/    resolved config, tokenizer reference, mesh, process count, eval metrics  [JSON]
# Orbax writes <step>.orbax-checkpoint-tmp-* and renames it to <step> only
# after every item of every process is written (atomic commit), so a process
# killed during a save leaves the previous checkpoints as they were.
# =============================================================================

import asyncio
import contextlib
import errno
import json
import logging
import shutil
import time

import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
# Exit code of a run stopped by SIGTERM after writing its checkpoint (sysexits EX_TEMPFAIL:
# "temporary failure, retry"): rerunning the same command resumes from that checkpoint.
# Signal handling lives in llmjax/train/signals.py.
EXIT_PREEMPTED = 75




# ---------------------------------------------------------------- the data item

class DataStateHandler(ocp.AsyncCheckpointHandler):
    """Per-process JSON (data iterator state): every process writes process_<index>.json,
    in the background with the arrays (the commit waits for every process's file)."""

    async def async_save(self, directory, args: "DataSave"):
        path = Path(directory) / f"process_{jax.process_index()}.json"
        data = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                "state": args.state}

        async def write():
            await asyncio.to_thread(_write_json, path, data)
        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="llmjax_data_save")]

    def save(self, directory, args: "DataSave"):
        _write_json(Path(directory) / f"process_{jax.process_index()}.json",
                    {"process_index": jax.process_index(), "process_count": jax.process_count(),
                     "state": args.state})

    def restore(self, directory, args: "DataRestore" = None):
        path = Path(directory) / f"process_{jax.process_index()}.json"
        if not path.exists():
            present = sorted(p.name for p in Path(directory).glob("process_*.json"))
            raise CheckpointError(f"{path} is missing (present: {present}): the checkpoint was "
                                  f"written by another number of processes, or is incomplete")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path} is unreadable or truncated: {err}") from None
        return data["state"]

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    pass


# ---------------------------------------------------------------- state <-> saved form

def _saved_form(state, base=None) -> dict:
    """TrainState -> the dict orbax stores (the PRNG key as its raw uint32 data); with a
    BaseRef (llmjax/peft/base_ref.py) the frozen leaves read from the base are left out."""
    frozen = state.frozen if base is None else base.stored(state.frozen)
    return {"step": state.step, "params": state.params, "frozen": frozen,
            "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}


def _abstract_saved_form(abstract, shardings, base=None) -> dict:
    """ShapeDtypeStructs (with the target shardings) of `_saved_form(state, base)`."""
    rng_data = jax.eval_shape(jax.random.key_data, abstract.rng)
    def sds(leaf, sh):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh)
    return {"step": sds(abstract.step, shardings.step),
            "params": jax.tree.map(sds, abstract.params, shardings.params),
            "frozen": jax.tree.map(sds, abstract.frozen, shardings.frozen) if base is None
            else base.stored(jax.tree.map(sds, abstract.frozen, shardings.frozen)),
            "opt_state": jax.tree.map(sds, abstract.opt_state, shardings.opt_state),
            "rng": jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=shardings.rng)}


def _rng_impl_name() -> str:
    return str(jax.random.key_impl(jax.random.key(0)))


def tokenizer_reference(config: Config) -> Optional[dict]:
    """{path, model_sha256} of the run's tokenizer (None without one)."""
    directory = config.data.tokenizer
    if not directory:
        return None
    ref: dict = {"path": str(Path(directory).expanduser().absolute())}
    meta = Path(directory).expanduser() / "llmjax_tokenizer.json"
    if meta.exists():
        data = json.loads(meta.read_text())
        ref["model_sha256"] = data.get("model_sha256")
        ref["vocab_size"] = data.get("vocab_size")
    return ref


def check_tree(saved: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Same leaf paths, shapes and dtypes, else a CheckpointError naming the leaves."""
    missing = [k for k in wanted if k not in saved]
    extra = [k for k in saved if k not in wanted]
    problems = []
    if missing:
        problems.append(f"{len(missing)} leaves missing from the checkpoint: {_few(missing)}")
    if extra:
        problems.append(f"{len(extra)} leaves in the checkpoint but not in this model/optimizer: "
                        f"{_few(extra)}")
    for key in wanted:
        if key in saved:
            s, w = saved[key], wanted[key]
            if tuple(s.shape) != tuple(w.shape):
                problems.append(f"leaf {key}: checkpoint shape {tuple(s.shape)} vs "
                                f"{tuple(w.shape)} in this config")
            elif np.dtype(s.dtype) != np.dtype(w.dtype):
                problems.append(f"leaf {key}: checkpoint dtype {np.dtype(s.dtype)} vs "
                                f"{np.dtype(w.dtype)} in this config")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match this run:\n  " +
                              "\n  ".join(problems[:20]) +
                              ("\n  ..." if len(problems) > 20 else ""))


def _few(items: list, n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _tree_metadata(directory: Path) -> dict[str, Any]:
    """{leaf path: metadata with .shape/.dtype} of an orbax PyTree directory."""
    if not directory.exists():
        raise CheckpointError(f"{directory} is missing: the checkpoint is incomplete")
    for name in ("_METADATA",):
        if not (directory / name).exists():
            raise CheckpointError(f"{directory / name} is missing: the checkpoint is incomplete "
                                  f"or was not written by orbax")
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(directory)
    except Exception as err:  # noqa: BLE001 (orbax/tensorstore raise many kinds)
        raise CheckpointError(f"cannot read the metadata of {directory}: "
                              f"{type(err).__name__}: {err}") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return flatten(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


# ---------------------------------------------------------------- the manager

def _remove_unfinished_saves(directory: Path) -> None:
    """Delete the uncommitted <step>.orbax-checkpoint-tmp* left by a process killed mid-save
    (primary process only; everyone waits for it before orbax touches the directory)."""
    if jax.process_index() == 0 and directory.is_dir():
        for path in sorted(directory.glob("*.orbax-checkpoint-tmp*")):
            log.warning("removing unfinished checkpoint %s (its save never committed)", path)
            if path.is_dir():
                _rmtree(path)
            else:
                path.unlink()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("llmjax: unfinished checkpoints removed")


def _rmtree(path: Path) -> None:
    """shutil.rmtree that outlasts the writers of a save that failed in this very process
    (after a failed synchronous save orbax's other items may still be writing for a moment)."""
    for _ in range(50):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.1)
    shutil.rmtree(path)  # still there: raise the real error


class TrainCheckpoints:
    """Save and restore a run's train state, data state and metadata (run_dir/checkpoints)."""

    def __init__(self, run_dir: str | os.PathLike, config: Config, read_only: bool = False):
        """read_only: for readers (eval) of a run that may be training and saving right now."""
        self.config = config
        self.directory = (Path(run_dir).expanduser() / CHECKPOINT_DIR).absolute()
        cc = config.checkpoint
        policies = [ocp.checkpoint_managers.LatestN(n=max(cc.keep, 1))]
        if cc.keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                keep_checkpoints_without_metrics=False))
        if not read_only:
            _remove_unfinished_saves(self.directory)
        # Not orbax's cleanup_tmp_directories: it deletes in a background thread that the first
        # save does not wait for, and races it on the same <step>.orbax-checkpoint-tmp path.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cc.async_save, create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": DataStateHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        self.last_save_seconds = 0.0
        self._failed = False  # a save failed and was reported
        self.base = None  # BaseRef: checkpoints of a PEFT run reference its frozen base

    # -- queries
    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # -- save
    def save(self, step: int, state, data_state: Any, mesh=None,
             eval_metrics: Optional[dict] = None) -> None:
        """Start saving `state` at `step`; returns once the arrays are copied off the devices
        (async) or written (sync). Training may donate/overwrite `state` right after."""
        meta = {"format": FORMAT_VERSION, "step": int(step), "time": time.time(),
                "config": self.config.to_dict(), "tokenizer": tokenizer_reference(self.config),
                "process_count": jax.process_count(), "device_count": jax.device_count(),
                "mesh": dict(mesh.shape) if mesh is not None else None,
                "rng_impl": _rng_impl_name(),
                "eval": {k: float(v) for k, v in (eval_metrics or {}).items()}}
        if self.base is not None:
            meta["base"] = self.base.to_dict()
        metrics = {"eval_loss": float(eval_metrics["loss"])} if eval_metrics else None
        start = time.perf_counter()
        with self._disk_errors():
            self.manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saved_form(state, self.base)),
                data=DataSave(data_state), meta=ocp.args.JsonSave(meta)), metrics=metrics,
                force=True)
        self.last_save_seconds = time.perf_counter() - start
        log.info("checkpoint %d: %s in %.2fs%s", step, "started" if self.config.checkpoint.async_save
                 else "written", self.last_save_seconds,
                 " (writing in the background)" if self.config.checkpoint.async_save else "")

    def wait(self) -> None:
        with self._disk_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        except CheckpointError:
            if not self._failed:  # not yet reported: say it
                raise
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 (a failed save was reported above)
                if not self._failed:
                    raise

    @contextlib.contextmanager
    def _disk_errors(self):
        """An OSError while writing (no space, read-only, permissions), in this thread or the
        background save, as one line naming the path; the uncommitted save is left as
        <step>.orbax-checkpoint-tmp* (removed at the next start) and earlier checkpoints
        stay intact."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 (orbax wraps background errors variously)
            cause = _os_error(err)
            if cause is None or self._failed:
                raise
            self._failed = True
            kept = self.all_steps()  # committed ones only: a failed save never commits
            raise CheckpointError(
                f"cannot write a checkpoint in {self.directory}: {describe_os_error(cause)}; "
                f"earlier checkpoints {kept or '(none)'} are intact: free space or fix "
                f"permissions, then rerun the same command to resume") from None

    # -- restore
    def read_meta(self, step: int) -> dict:
        path = self.step_dir(step) / "meta" / "metadata"
        if not path.exists():
            raise CheckpointError(f"{path} is missing: checkpoint {step} is incomplete")
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise CheckpointError(f"{path} is truncated or not JSON: {err}") from None

    def restore(self, step: int, exp, abstract=None, shardings=None):
        """(TrainState on exp's mesh, this process's data state, meta) of checkpoint `step`."""
        where = str(self.step_dir(step))
        meta = self.read_meta(step)
        check_compatible(meta.get("config", {}).get("model", {}), exp.model_config, where)
        if meta.get("rng_impl") not in (None, _rng_impl_name()):
            raise CheckpointError(f"{where}: PRNG implementation {meta['rng_impl']} vs "
                                  f"{_rng_impl_name()} now (jax_default_prng_impl)")
        _check_tokenizer(meta.get("tokenizer"), self.config, where)
        abstract = abstract or exp.abstract_state()
        shardings = shardings or exp.state_shardings(abstract)
        from llmjax.peft.base_ref import BaseRef
        base = BaseRef.from_dict(meta.get("base"))
        target = _abstract_saved_form(abstract, shardings, base)
        state_dir = self.step_dir(step) / "state"
        check_tree(_tree_metadata(state_dir), flatten(target), where + "/state")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=DataRestore()))
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(_diagnose(state_dir, target, err)) from None
        saved = restored["state"]
        if base is not None:  # the frozen base leaves come from the base, fingerprint-checked
            from llmjax.peft.base_ref import restore_frozen
            saved["frozen"] = restore_frozen(base, abstract.frozen, shardings.frozen,
                                             saved["frozen"], where, self.config.train.init_from)
            self.base = base
        rng = jax.jit(lambda d: jax.random.wrap_key_data(d), out_shardings=shardings.rng)(
            saved["rng"])
        from llmjax.train.state import TrainState
        state = TrainState(step=saved["step"], params=saved["params"], frozen=saved["frozen"],
                           opt_state=saved["opt_state"], rng=rng)
        return state, restored["data"], meta


def _os_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind `err` (itself, its cause/context chain, or an exception group)."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def describe_os_error(err: OSError) -> str:
    """'No space left on device [ENOSPC] (path)': the problem, its errno name, the path."""
    name = errno.errorcode.get(err.errno or 0, "")
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return f"{err.strerror or err}{f' [{name}]' if name else ''}{where}"


def _diagnose(state_dir: Path, target: dict, err: Exception, partial: bool = False) -> str:
    """Name the leaf that cannot be read: restore leaves one by one until one fails.

    Each try restores one leaf of the very tree that failed, the others replaced by orbax's
    PLACEHOLDER (skipped), so the tree structure (lists and tuples in optimizer states)
    matches the saved one. `partial`: `target` is a nested dict of some leaves only
    (init_from, run params), restored with partial_restore."""
    message = f"cannot read {state_dir}: {_root_cause(err)}"
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            for i, (path, leaf) in enumerate(flat):
                key = path_str(path)
                if partial:
                    sub = unflatten({key: leaf})
                else:
                    leaves = [ocp.PLACEHOLDER] * len(flat)
                    leaves[i] = leaf
                    sub = jax.tree_util.tree_unflatten(treedef, leaves)
                restore_args = jax.tree.map(
                    lambda x: x if x is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(
                        sharding=x.sharding, dtype=x.dtype), sub)
                try:
                    checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                        sub, restore_args=restore_args, partial_restore=partial))
                except Exception as leaf_err:  # noqa: BLE001
                    return (f"cannot read leaf {key} {tuple(leaf.shape)} of {state_dir}: "
                            f"{_root_cause(leaf_err)}")
    except Exception:  # noqa: BLE001 (diagnosis is best effort)
        pass
    return message


def _root_cause(err: BaseException) -> str:
    """The innermost cause's message (tensorstore's 'OUT_OF_RANGE: Error reading ...' rather
    than orbax's wrapper holding the whole TensorStore spec), one line, bounded."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:400]}"


def _check_tokenizer(saved: Optional[dict], config: Config, where: str) -> None:
    now = tokenizer_reference(config)
    if not saved or not now:
        if bool(saved) != bool(now):
            raise CheckpointError(f"{where} was written {'with' if saved else 'without'} a "
                                  f"tokenizer ({(saved or {}).get('path')}); this config has "
                                  f"data.tokenizer={config.data.tokenizer!r}")
        return
    if saved.get("model_sha256") and now.get("model_sha256") and \
            saved["model_sha256"] != now["model_sha256"]:
        raise CheckpointError(f"{where} was trained with tokenizer {saved['path']} (sha256 "
                              f"{saved['model_sha256'][:12]}); data.tokenizer={now['path']} is a "
                              f"different model (sha256 {now['model_sha256'][:12]}): use the "
                              f"same tokenizer, or start a new train.run_dir")


def check_compatible(saved_model: dict, model: ModelConfig, where: str) -> None:
    """Family, architecture and vocabulary must agree (clear errors before any shape check)."""
    if not saved_model:
        return
    for key in ("family", "architecture", "vocab_size"):
        if key in saved_model and saved_model[key] != getattr(model, key):
            raise CheckpointError(
                f"{where} holds a model with {key}={saved_model[key]!r}, but this config has "
                f"model.{key}={getattr(model, key)!r}: parameters cannot be loaded across "
                f"{'vocabularies' if key == 'vocab_size' else key + 's'}"
                + (" (use the tokenizer and vocab_size the checkpoint was trained with)"
                   if key == "vocab_size" else ""))


# ---------------------------------------------------------------- init_from (fine-tuning)

@dataclasses.dataclass
class InitReport:
    """What `init_from` did with each parameter leaf of the new model."""

    source: str
    loaded: list = dataclasses.field(default_factory=list)
    new: list = dataclasses.field(default_factory=list)  # freshly initialised (e.g. new heads)
    dropped: list = dataclasses.field(default_factory=list)  # in the source, not in this model
    resized: list = dataclasses.field(default_factory=list)  # position tables cut to max_len
    cast: list = dataclasses.field(default_factory=list)  # loaded with another dtype
    overridden: list = dataclasses.field(default_factory=list)  # train.init_override fields
    runtime: list = dataclasses.field(default_factory=list)  # run-time model fields changed

    def summary(self) -> str:
        lines = [f"init_from {self.source}: {len(self.loaded)} leaves loaded, {len(self.new)} new "
                 f"(freshly initialised), {len(self.dropped)} dropped"]
        for title, items in (("new", self.new), ("dropped", self.dropped),
                             ("resized", self.resized), ("cast", self.cast),
                             ("override", self.overridden), ("run-time", self.runtime)):
            for item in items:
                lines.append(f"  {title:8s} {item}")
        return "\n".join(lines)


# ModelConfig fields that may differ between an init_from source and the new model: how
# the model runs (precision, memory, kernels, dropout, init of new leaves), its heads
# (new heads are initialised, old ones dropped: both listed) and the PEFT hooks. Every
# other field is architecture: same-shaped weights would compute something else.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl", "kernels",
                  "dropout", "initializer_range", "pooler", "mlm_head", "nsp_head", "num_labels",
                  "prompt_tokens", "prefix_tokens", "adapter_dim")
# Optional sizes compared by their effective value (None = the default derived size).
_EFFECTIVE = {"num_kv_heads": "kv_heads", "head_dim": "dim_per_head",
              "num_decoder_layers": "decoder_layers"}


def architecture_changes(saved_model: dict, model: ModelConfig, overrides, report,
                         where: str) -> list[str]:
    """Compare every ModelConfig field of the source with the target: run-time differences
    and train.init_override'd ones go to the report; returns the other differences (errors).
    A learned position table cut to a shorter max_len is allowed (and listed)."""
    from llmjax.config import section_from_dict
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        source = section_from_dict(ModelConfig, {k: v for k, v in saved_model.items() if k in known},
                        "model")
    except ConfigError as err:
        raise CheckpointError(f"{where}: its model config cannot be read: {err}") from None
    errors = []
    for name in sorted(known & set(saved_model)):
        attr = _EFFECTIVE.get(name, name)
        old, new = getattr(source, attr), getattr(model, attr)
        if old == new:
            continue
        change = f"model.{name} {old!r} -> {new!r}"
        if name in RUNTIME_FIELDS:
            report.runtime.append(change)
        elif name in overrides:
            report.overridden.append(change)
        elif name == "max_len" and model.position == "learned" and new < old:
            report.overridden.append(change + " (learned position table cut)")
        else:
            errors.append(change)
    return errors


def resolve_source(path: str | os.PathLike, allow_base_ref: bool = False
                   ) -> tuple[Path, list[str], dict]:
    """(orbax tree dir, subtrees holding params, config dict) of a run dir, a checkpoint step
    dir or a parameter export.

    A PEFT run's checkpoint that references its base (llmjax/peft/base_ref.py) does not hold
    the frozen base leaves: reading it as a parameter source is an error unless the caller
    follows the reference (`allow_base_ref`, as load_run_params does)."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"init_from={str(path)!r} does not exist")
    if (path / CHECKPOINT_DIR).is_dir():
        steps = sorted(int(p.name) for p in (path / CHECKPOINT_DIR).iterdir() if p.name.isdigit())
        if not steps:
            raise CheckpointError(f"{path / CHECKPOINT_DIR} holds no finished checkpoint")
        path = path / CHECKPOINT_DIR / str(steps[-1])
    if (path / "state").is_dir():
        meta_path = path / "meta" / "metadata"
        if not meta_path.exists():
            raise CheckpointError(f"{meta_path} is missing: checkpoint {path} is incomplete")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as err:
            raise CheckpointError(f"{meta_path} is truncated or not JSON: {err}") from None
        if meta.get("base") and not allow_base_ref:
            raise CheckpointError(
                f"{path} is a PEFT checkpoint that references its base "
                f"{meta['base'].get('path')} instead of storing it: export the fine-tuned "
                f"model first (llmjax export {path} OUT) and use OUT")
        return path / "state", ["params", "frozen"], meta.get("config", {})
    if (path / "params").is_dir() or (path / "config.yaml").exists():
        config = read_config(path)
        if not (path / "params").is_dir():
            raise CheckpointError(f"{path / 'params'} is missing: the parameter export is incomplete")
        return path / "params", [], config
    raise CheckpointError(f"init_from={str(path)!r} is neither a run directory (with "
                          f"{CHECKPOINT_DIR}/), a checkpoint step directory (with state/) nor a "
                          f"parameter export (with params/ and config.yaml)")


def _is_position_table(key: str) -> bool:
    """Learned position embeddings (.../position/embedding): rows per position."""
    parts = key.split("/")
    return len(parts) >= 2 and "position" in parts[-2]


def init_from(exp, path: str | os.PathLike):
    """A fresh TrainState of `exp` (step 0, new optimizer state) whose parameters come from
    `path` wherever this model has a leaf of the same path; returns (state, InitReport).

    Leaves only in the new model (new heads) keep their fresh initialisation, leaves only in
    the source (old heads) are dropped; learned position tables longer than this model's
    max_len are cut. Any other shape mismatch on a shared leaf is an error naming it.
    """
    import flax.linen as nn
    from llmjax import parallel
    from llmjax.models import abstract_params
    from llmjax.tree import tree_names

    tree_dir, prefixes, source_config = resolve_source(path)
    where = str(tree_dir.parent)
    check_compatible(source_config.get("model", {}), exp.model_config, where)
    saved = _tree_metadata(tree_dir)
    source: dict[str, tuple[str, Any]] = {}  # param path -> (path in the tree, metadata)
    if prefixes:
        for prefix in reversed(prefixes):  # earlier prefixes win
            for key, leaf in saved.items():
                if key.startswith(prefix + "/"):
                    source[key[len(prefix) + 1:]] = (key, leaf)
    else:
        source = {key: (key, leaf) for key, leaf in saved.items()}

    rng = jax.random.key(exp.config.train.seed)
    abstract = abstract_params(exp.model_config, boxed=False)
    shardings = parallel.logical_shardings(tree_names(abstract, exp.names), abstract,
                                           exp.mesh, exp.rules)
    wanted = flatten(abstract)
    wanted_sh = flatten(shardings)
    report = InitReport(source=where)
    arch_errors = architecture_changes(source_config.get("model", {}), exp.model_config,
                                       exp.config.train.init_override, report, where)
    restore_target: dict[str, Any] = {}
    errors = []
    for key, leaf in wanted.items():
        if key not in source:
            report.new.append(f"{key} {tuple(leaf.shape)}")
            continue
        tree_key, meta = source[key]
        shape, saved_shape = tuple(leaf.shape), tuple(meta.shape)
        sharding = wanted_sh[key]
        if shape != saved_shape:
            if (_is_position_table(key) and len(shape) == len(saved_shape) and
                    shape[1:] == saved_shape[1:] and saved_shape[0] >= shape[0]):
                report.resized.append(f"{key} {saved_shape} -> {shape}")
                sharding = parallel.replicated(exp.mesh)
            else:
                errors.append(f"leaf {key}: checkpoint shape {saved_shape} vs {shape} in this model")
                continue
        if np.dtype(meta.dtype) != np.dtype(leaf.dtype):
            report.cast.append(f"{key} {np.dtype(meta.dtype)} -> {np.dtype(leaf.dtype)}")
        report.loaded.append(key)
        restore_target[tree_key] = jax.ShapeDtypeStruct(saved_shape, meta.dtype, sharding=sharding)
    if errors:
        raise CheckpointError(f"init_from {where}: parameters do not fit this model:\n  " +
                              "\n  ".join(errors) + (f"\n  (architecture differences: "
                                                      f"{', '.join(arch_errors)})"
                                                      if arch_errors else ""))
    if arch_errors:
        names = [c.split()[0].split(".", 1)[1] for c in arch_errors]
        raise CheckpointError(
            f"init_from {where}: this model's architecture differs from the source's: "
            f"{', '.join(arch_errors)}; the weights would load into a model that computes "
            f"something else. Match these model fields to the source, or list the ones you "
            f"mean to change: train.init_override=[{','.join(names)}]")
    report.dropped = sorted(f"{k} {tuple(m.shape)}" for k, (_, m) in source.items()
                            if k not in wanted)
    if not report.loaded:
        raise CheckpointError(f"init_from {where}: no parameter path matches this model "
                              f"(source leaves: {_few(sorted(source))})")

    flat_restored = flatten(_restore_leaves(tree_dir, restore_target))
    loaded = {key: flat_restored[source[key][0]] for key in report.loaded}

    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        state = _init_with(exp, rng, loaded)
    return state, report


def _restore_leaves(tree_dir: Path, target: dict[str, Any]) -> dict:
    """Restore only the leaves named in `target` ({'a/b/c': ShapeDtypeStruct with sharding})
    from an orbax PyTree checkpoint; returns them nested."""
    nested = unflatten(target)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(tree_dir, args=ocp.args.PyTreeRestore(
                nested, restore_args=jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), nested),
                partial_restore=True))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(_diagnose(tree_dir, nested, err, partial=True)) from None


def _init_with(exp, rng, loaded: dict):
    """exp's sharded init with `loaded` leaves swapped in; the loaded arrays are arguments of
    the jitted function (not closed-over constants baked into the executable)."""
    def fn(r, arrays):
        def swap(params):
            def one(path, leaf):
                key = path_str(path)
                if key not in arrays:
                    return leaf
                value = arrays[key]
                if value.shape != leaf.shape:  # a longer position table, cut to max_len
                    value = value[tuple(slice(0, n) for n in leaf.shape)]
                return value.astype(leaf.dtype)
            return jax.tree_util.tree_map_with_path(one, params)
        return exp._init_fn(r, loaded=swap)

    state_sh = exp.state_shardings(exp.abstract_state())
    return jax.jit(fn, out_shardings=state_sh)(rng, loaded)


def load_run_params(path: str | os.PathLike) -> tuple[ModelConfig, Any, dict]:
    """(model config, parameters the model applies, run config) of a run directory or a
    checkpoint step directory, on the default device: params and frozen leaves only (no
    optimizer state), with the run's PEFT plan merged in (LoRA, IA3, prompts, ...)."""
    from llmjax import peft
    from llmjax.config import section_from_dict
    model_cfg, trainable, frozen, config = load_run_trees(path)
    plan = peft.build(section_from_dict(peft.PeftConfig, config.get("peft", {}), "peft"))
    return model_cfg, plan.merge(trainable, frozen), config


def load_run_trees(path: str | os.PathLike, with_base: bool = True
                   ) -> tuple[ModelConfig, Any, Any, dict]:
    """(hooked model config, trainable tree, frozen tree, run config) of a run directory
    (latest checkpoint) or a checkpoint step directory, on the default device; the frozen
    base leaves a PEFT checkpoint references are read from its base (fingerprint-checked)
    unless with_base=False (then frozen holds only the leaves the checkpoint stores)."""
    from llmjax import peft
    from llmjax.config import section_from_dict
    from llmjax.peft import base_ref
    tree_dir, prefixes, config = resolve_source(path, allow_base_ref=True)
    if not prefixes:
        raise CheckpointError(f"{path} is a parameter export, not a run: use load_params")
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {key: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=single)
              for key, m in _tree_metadata(tree_dir).items() if key.split("/")[0] in prefixes}
    restored = _restore_leaves(tree_dir, target)
    plan = peft.build(section_from_dict(peft.PeftConfig, config.get("peft", {}), "peft"))
    model_cfg = plan.model_config(section_from_dict(ModelConfig, config.get("model", {}), "model"))
    trainable, frozen = restored.get("params", {}), restored.get("frozen", {})
    ref = base_ref.read_ref(tree_dir.parent)
    if ref is not None and with_base:
        frozen = base_ref.restore_frozen_single(ref, model_cfg, frozen, str(tree_dir.parent),
                                                config.get("train", {}).get("init_from", ""))
    return model_cfg, trainable, frozen, config


@dataclasses.dataclass
class Source:
    """A model read from anything init_from accepts, as the model applies it."""

    model: ModelConfig  # with the source run's PEFT hooks on (prompt, prefix, adapters)
    params: Any  # on the default device, PEFT deltas merged
    config: dict  # the run config, or the export's config.yaml
    tokenizer: Optional[Path]  # the directory holding its tokenizer, if known


def load_source(path: str | os.PathLike) -> Source:
    """One loader for run directories (latest checkpoint), checkpoint step directories and
    parameter exports: what `peft merge --base`, `llmjax export` and sharing read."""
    from llmjax.config import section_from_dict
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / CHECKPOINT_DIR).is_dir() or (path / "state").is_dir():
        model_cfg, params, config = load_run_params(path)
        step_dir = resolve_source(path, allow_base_ref=True)[0].parent
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
        tok = (meta.get("tokenizer") or {}).get("path")  # absolute, unlike data.tokenizer
        return Source(model_cfg, params, config, Path(tok) if tok else None)
    tree_dir, _, config = resolve_source(path)
    if config.get("kind"):  # e.g. peft_adapter: trainable leaves only, not a whole model
        raise CheckpointError(f"{path} is a {config['kind']} export, not a model: merge it "
                              f"onto its base first (llmjax peft merge {path} OUT)")
    params, config = load_params(tree_dir.parent)
    model_cfg = section_from_dict(ModelConfig, dict(config.get("model", config)), "model")
    tok = tree_dir.parent / "tokenizer"
    return Source(model_cfg, params, config, tok if tok.is_dir() else None)
