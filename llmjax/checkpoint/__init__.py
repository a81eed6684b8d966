"""Checkpoint storage: what llmjax writes to disk or object storage, and reading it back.

- `params`: parameter exports (config.yaml + params/ [+ tokenizer/]): save_params,
  load_params, read_config, write_params_export;
- `train_checkpoints`: a run's train checkpoints (orbax CheckpointManager over
  run_dir/checkpoints: state, data, meta items), async saves whose failures surface in the loop;
- `data_state`: the data item (each process's iterator state, JSON);
- `run_meta`: the meta item and the compatibility checks a resume makes;
- `integrity`: whether a committed step is complete (resume skips torn ones);
- `trees`: orbax PyTree directories leaf by leaf (metadata, partial restore, diagnosis);
- `location`: step directories, what a path holds (paths themselves: llmjax/paths.py).

Storage only: building a train state from a checkpoint (resume, `train.init_from`) is
llmjax/train/; a run's model with its PEFT plan merged is llmjax/loader.py.
"""
from llmjax.checkpoint.data_state import DataRestore, DataSave, DataStateHandler
from llmjax.checkpoint.location import CHECKPOINT_DIR, resolve_source
from llmjax.checkpoint.params import load_params, read_config, save_params, write_params_export
from llmjax.checkpoint.run_meta import FORMAT_VERSION, check_compatible, tokenizer_reference
from llmjax.checkpoint.train_checkpoints import TrainCheckpoints, describe_os_error
from llmjax.checkpoint.trees import TornCheckpointError
from llmjax.errors import CheckpointError

# Exit code of a run stopped by SIGTERM after writing its checkpoint (sysexits EX_TEMPFAIL:
# "temporary failure, retry"): rerunning the same command resumes from that checkpoint.
# Signal handling lives in llmjax/train/signals.py.
EXIT_PREEMPTED = 75

__all__ = ["CHECKPOINT_DIR", "CheckpointError", "DataRestore", "DataSave", "DataStateHandler",
           "EXIT_PREEMPTED", "FORMAT_VERSION", "TornCheckpointError", "TrainCheckpoints",
           "check_compatible", "describe_os_error", "load_params", "read_config",
           "resolve_source", "save_params", "tokenizer_reference", "write_params_export"]
