"""Training checkpoints: an orbax CheckpointManager over run_dir/checkpoints.

run_dir/checkpoints/<step>/
  state/   train state: step, params, frozen, opt_state, rng (key data)  [orbax PyTree, OCDBT]
  data/    process_<i>.json: data iterator state of process i (one per host)
  meta/    resolved config, tokenizer reference, mesh, process count, eval metrics  [JSON]
Orbax writes <step>.orbax-checkpoint-tmp-* and renames it to <step> only after every item of
every process is written (atomic commit; on object storage a commit_success.txt marks it), so
a process killed during a save leaves the previous checkpoints as they were.

Storage only: the saved form is a plain dict; turning it into a TrainState (and reading a PEFT
run's frozen base) is llmjax/train/resume.py's job.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from llmjax.checkpoint.data_state import DataRestore, DataSave, DataStateHandler
from llmjax.checkpoint.integrity import step_problem
from llmjax import paths
from llmjax.checkpoint.location import CHECKPOINT_DIR, PathLike, read_step_meta, step_numbers
from llmjax.checkpoint.run_meta import build_meta
from llmjax.checkpoint.trees import TornCheckpointError, check_tree, diagnose, root_cause, \
    tree_metadata
from llmjax.config import Config
from llmjax.errors import CheckpointError
from llmjax.tree import flatten, unflatten

log = logging.getLogger(__name__)

SET_ASIDE_DIR = "checkpoints.incomplete"  # run_dir/<this>/<step>-<time>: skipped torn steps


# ---------------------------------------------------------------- state <-> saved form

def saved_form(state, base=None) -> dict:
    """A train state (step, params, frozen, opt_state, rng) -> the dict orbax stores (the PRNG
    key as its raw uint32 data); with a base reference (llmjax/peft/base_ref.py, anything with
    .stored(frozen)) the frozen leaves read from the base are left out."""
    frozen = state.frozen if base is None else base.stored(state.frozen)
    return {"step": state.step, "params": state.params, "frozen": frozen,
            "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}


def abstract_saved_form(abstract, shardings, base_leaves=None) -> dict:
    """ShapeDtypeStructs (with the target shardings) of `saved_form(state, base)`;
    `base_leaves`: the frozen leaf paths a base reference reads from the base."""
    rng_data = jax.eval_shape(jax.random.key_data, abstract.rng)

    def sds(leaf, sh):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh)
    frozen = jax.tree.map(sds, abstract.frozen, shardings.frozen)
    if base_leaves:
        skip = set(base_leaves)
        frozen = unflatten({k: v for k, v in flatten(frozen).items() if k not in skip})
    return {"step": sds(abstract.step, shardings.step),
            "params": jax.tree.map(sds, abstract.params, shardings.params),
            "frozen": frozen,
            "opt_state": jax.tree.map(sds, abstract.opt_state, shardings.opt_state),
            "rng": jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=shardings.rng)}


# ---------------------------------------------------------------- the manager

def _remove_unfinished_saves(directory: epath.Path) -> None:
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


def _rmtree(path: epath.Path) -> None:
    """rmtree that outlasts the writers of a save that failed in this very process (after a
    failed synchronous save orbax's other items may still be writing for a moment)."""
    for _ in range(50):
        try:
            path.rmtree()
        except OSError:
            pass
        if not path.exists():
            return
        time.sleep(0.1)
    path.rmtree()  # still there: raise the real error


class TrainCheckpoints:
    """Save and restore a run's train state, data state and metadata (run_dir/checkpoints)."""

    def __init__(self, run_dir: PathLike, config: Config, read_only: bool = False):
        """read_only: for readers (eval) of a run that may be training and saving right now."""
        self.config = config
        self.run_dir = paths.absolute(run_dir, "train.run_dir")
        self.directory = self.run_dir / CHECKPOINT_DIR
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
        self._saving: Optional[int] = None  # step of a save not yet known to have committed
        self.base = None  # BaseRef: checkpoints of a PEFT run reference its frozen base

    # -- queries
    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def steps_on_disk(self) -> list[int]:
        """Every step directory, committed per orbax or not (torn ones included)."""
        return sorted(set(step_numbers(self.directory)) | set(self.all_steps()))

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def problem(self, step: int) -> Optional[str]:
        """Why checkpoint `step` is incomplete, or None (llmjax/checkpoint/integrity.py)."""
        return step_problem(self.step_dir(step))

    # -- save
    def save(self, step: int, state, data_state: Any, mesh=None,
             eval_metrics: Optional[dict] = None) -> None:
        """Start saving `state` at `step`; returns once the arrays are copied off the devices
        (async) or written (sync). Training may donate/overwrite `state` right after."""
        meta = build_meta(self.config, step, mesh, eval_metrics, self.base)
        metrics = {"eval_loss": float(eval_metrics["loss"])} if eval_metrics else None
        start = time.perf_counter()
        with self._save_errors(step):
            self.manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(saved_form(state, self.base)),
                data=DataSave(data_state), meta=ocp.args.JsonSave(meta)), metrics=metrics,
                force=True)
        self._saving = int(step)
        self.last_save_seconds = time.perf_counter() - start
        log.info("checkpoint %d: %s in %.2fs%s", step, "started" if self.config.checkpoint.async_save
                 else "written", self.last_save_seconds,
                 " (writing in the background)" if self.config.checkpoint.async_save else "")

    def check_background_save(self) -> None:
        """Raise now (not at the next save) if the background save has failed; a no-op while
        it is still writing or when it committed. Cheap: call it every step. With several
        processes it waits for the next save or the end (raised there on every host at the
        same step, instead of on one host while the others run into the next collective)."""
        if self._saving is None or jax.process_count() > 1 or \
                self.manager.is_saving_in_progress():
            return
        self.wait()  # finished: joining returns at once, raising what the save raised

    def wait(self) -> None:
        with self._save_errors(self._saving):
            self.manager.wait_until_finished()
        self._saving = None

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
    def _save_errors(self, step: Optional[int]):
        """A failed save, in this thread or orbax's background thread, as one line naming the
        step and the cause. An OSError (no space, read-only, permissions) names the path. The
        uncommitted save is left as <step>.orbax-checkpoint-tmp* (removed at the next start)
        and earlier checkpoints stay intact."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 (orbax wraps background errors variously)
            if self._failed or isinstance(err, CheckpointError):
                raise
            self._failed = True
            self._saving = None
            kept = self.all_steps()  # committed ones only: a failed save never commits
            cause = _os_error(err)
            if cause is not None:
                raise CheckpointError(
                    f"cannot write a checkpoint in {self.directory}: {describe_os_error(cause)}; "
                    f"earlier checkpoints {kept or '(none)'} are intact: free space or fix "
                    f"permissions, then rerun the same command to resume") from None
            raise CheckpointError(
                f"checkpoint {step if step is not None else ''} in {self.directory} could not be "
                f"saved: {root_cause(err)}; earlier checkpoints {kept or '(none)'} are intact: "
                f"rerun the same command to resume from the latest") from err

    # -- restore
    def read_meta(self, step: int) -> dict:
        return read_step_meta(self.step_dir(step))

    def restore(self, step: int, target: dict) -> tuple[dict, Any]:
        """(saved form, this process's data state) of checkpoint `step`, the arrays placed as
        `target` says (abstract_saved_form: ShapeDtypeStructs with shardings, any mesh).
        Unreadable or missing files are a TornCheckpointError; a tree that does not match
        `target` a CheckpointError naming the leaves."""
        where = str(self.step_dir(step))
        state_dir = self.step_dir(step) / "state"
        check_tree(tree_metadata(state_dir), flatten(target), where + "/state")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=DataRestore()))
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise TornCheckpointError(diagnose(state_dir, target, err)) from None
        return restored["state"], restored["data"]

    def set_aside(self, steps: list[int]) -> list[epath.Path]:
        """Move incomplete step directories out of checkpoints/ (never deleted: a person may
        want them) so new saves can use their step numbers; returns where they went. On
        object storage a move is a copy of every object, then a delete (paths.move)."""
        moved = []
        if jax.process_index() == 0:
            aside = self.run_dir / SET_ASIDE_DIR
            aside.mkdir(parents=True, exist_ok=True)  # a no-op on object storage
            for step in steps:
                moved.append(paths.move(self.step_dir(step), aside / f"{step}-{int(time.time())}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("llmjax: incomplete checkpoints set aside")
        paths.forget_listings(self.directory)  # the other hosts listed it before the move
        self.manager.reload()
        return moved


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
