"""The data item of a train checkpoint: each process's data-iterator state as JSON
(checkpoints/<step>/data/process_<i>.json), written in the background with the arrays (the
commit waits for every process's file).

Restored by the same number of processes, each gets its own state; by another number (a run
moved from 2 hosts x 4 devices to 1 x 8, or back), every process gets the list of all the
saved states, in process order, for the data pipeline to re-divide (BatchIterator.set_state)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from llmjax.checkpoint.trees import TornCheckpointError
from llmjax.errors import CheckpointError


def file_name(process_index: int) -> str:
    return f"process_{process_index}.json"


class DataStateHandler(ocp.AsyncCheckpointHandler):
    """Per-process JSON (data iterator state): every process writes process_<index>.json."""

    async def async_save(self, directory, args: "DataSave"):
        path = epath.Path(directory) / file_name(jax.process_index())
        data = _payload(args.state)

        async def write():
            await asyncio.to_thread(_write_json, path, data)
        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="llmjax_data_save")]

    def save(self, directory, args: "DataSave"):
        _write_json(epath.Path(directory) / file_name(jax.process_index()), _payload(args.state))

    def restore(self, directory, args: "DataRestore" = None):
        directory = epath.Path(directory)
        path = directory / file_name(jax.process_index())
        data = _read(path) if path.exists() else None
        if data is not None and int(data.get("process_count", 1)) == jax.process_count():
            return data["state"]
        # Written by another number of processes: every process's state, in process order.
        saved = [_read(p) for p in sorted(directory.glob("process_*.json"),
                                          key=lambda p: int(p.stem.split("_")[1]))]
        if not saved or [d.get("process_index") for d in saved] != list(range(len(saved))) \
                or any(int(d.get("process_count", 1)) != len(saved) for d in saved):
            # integrity.step_problem checked every file the meta names
            raise CheckpointError(f"{directory} does not hold one data state per process of "
                                  f"the run that wrote it ({[p.name for p in directory.glob('*')]})"
                                  f": the checkpoint is incomplete")
        return [d["state"] for d in saved]

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


def _payload(state: Any) -> dict:
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "state": state}


def _read(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TornCheckpointError(f"{path} is unreadable or truncated: {err}") from None


def _write_json(path: epath.Path, data: dict) -> None:
    path.write_text(json.dumps(data))


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    pass
