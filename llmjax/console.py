"""What reaches the user's terminal: llmjax's own log lines, not third-party chatter.

absl, TFDS, orbax and jax log INFO notices a user cannot act on; TFDS also prints "Downloading
and preparing dataset ..." / "Dataset ... downloaded and prepared" with `print` and draws tqdm
bars while it builds a dataset. Their ERROR records are hidden too: a failure that matters
reaches llmjax as an exception and becomes its one `llmjax: error:` line, while the library's
own record of it is a traceback (orbax logs one through absl for a failed background save).
`llmjax -v` shows all of it; `--debug` shows their errors with tracebacks.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("llmjax")

_THIRD_PARTY = ("absl", "tensorflow_datasets", "tensorflow", "orbax", "etils", "jax")
_verbose = False


def quiet_logging(verbose: bool = False, debug: bool = False) -> None:
    """llmjax's INFO lines on stderr; third-party loggers only CRITICAL (ERROR with debug,
    INFO with verbose)."""
    global _verbose
    _verbose = verbose
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO lines
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else
                                         logging.ERROR if debug else logging.CRITICAL)


def quiet_tfds() -> None:
    """Turn TFDS's progress bars and printed build notices into llmjax DEBUG log lines.

    Called by commands that build or read TFDS datasets (not at startup: importing TFDS costs
    ~0.3 s). The notices are private methods of DatasetBuilder; if a TFDS release renames them,
    they print again, nothing breaks.
    """
    if _verbose:
        return
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_builder

    tfds.disable_progress_bar()
    builder = dataset_builder.DatasetBuilder
    for name in ("_log_download_bytes", "_log_download_done"):
        if hasattr(builder, name):
            setattr(builder, name, _debug_notice)


def _debug_notice(self) -> None:
    log.debug("TFDS built %s in %s", self.name, self.data_dir)
