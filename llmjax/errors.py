"""The user error types (one hierarchy under ConfigError: CheckpointError, ConversionError,
MissingInputError), and which exceptions are the user's to fix with their one-line message
(used by `llmjax` main). A leaf module: it imports nothing else of llmjax.

ConfigError (and its subclasses) is the project's user error. Some user errors arrive as other
types: a missing or unreadable file (OSError with a filename), undecodable text, YAML or JSON
syntax, a missing optional package, and ValueError/RuntimeError raised by llmjax's own checks
(their messages are written for users). Anything else raised inside a library is a bug,
reported as an internal error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or inconsistent; more generally any
    input the user can fix. Also importable as llmjax.config.ConfigError."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, corrupted or incompatible with the run config.

    A ConfigError subclass, so the CLI reports it as a one-line error (exit code 2). Also
    importable as llmjax.checkpoint.CheckpointError."""


class ConversionError(ConfigError):
    """A checkpoint or config cannot be converted (unknown architecture, missing tensor,
    shape mismatch, unsupported config field).

    A ConfigError (and so a ValueError) subclass: the CLI reports it as a one-line error.
    Also importable as llmjax.convert.ConversionError and llmjax.convert.errors.ConversionError."""


class MissingInputError(ConfigError):
    """An input path named by the config (data files, tokenizer, init_from) does not exist: the
    CLI adds the setup steps named in the config's header comments, which create it."""


_PACKAGE_DIR = Path(__file__).resolve().parent
# Optional dependencies and the setup.py extra that installs each.
_EXTRAS = {"torch": "hf", "transformers": "hf", "peft": "hf", "gguf": "hf", "tokenizers": "hf",
           "tensorflow": "tf", "tensorboard": "tensorboard"}
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                FileExistsError)


def user_message(err: BaseException) -> Optional[str]:
    """The message to show for an error the user can fix, or None for a bug."""
    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, ModuleNotFoundError) and err.name and err.name.split(".")[0] != "llmjax":
        package = err.name.split(".")[0]
        extra = _EXTRAS.get(package)
        how = f"pip install -e '.[{extra}]'" if extra else f"pip install {package}"
        return f"this needs the Python package {package!r}, which is not installed: {how}"
    if isinstance(err, json.JSONDecodeError):  # llmjax parses JSON only from input files
        return (f"an input file is not valid JSON: {err.msg} at line {err.lineno}, column "
                f"{err.colno}{_json_file(err)}")
    if isinstance(err, UnicodeDecodeError):
        return (f"input is not {err.encoding} text ({err.reason} at byte {err.start}); "
                f"llmjax reads UTF-8 text files")
    if isinstance(err, OSError):
        if err.filename is not None:
            where = str(err.filename) + (f" -> {err.filename2}" if err.filename2 else "")
            return f"{where}: {err.strerror or err}"
        if isinstance(err, _FILE_ERRORS) and err.args:
            return str(err)
        return None
    if _is_yaml_error(err):
        return f"invalid YAML: {err}"
    if isinstance(err, (ValueError, RuntimeError)) and raised_by_llmjax(err):
        return str(err)
    return None


def raised_by_llmjax(err: BaseException) -> bool:
    """Whether the innermost frame of err's traceback is llmjax code (not a library's)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(_PACKAGE_DIR)
    except ValueError:
        return False
    return True


def _json_file(err: json.JSONDecodeError) -> str:
    """` (FILE)` when the llmjax frame that parsed the JSON holds exactly one path to a .json file."""
    tb, candidates = err.__traceback__, set()
    while tb is not None:
        frame = tb.tb_frame
        if Path(frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR):
            candidates = {str(v) for v in frame.f_locals.values() if isinstance(v, (str, os.PathLike))
                          and str(v).endswith(".json") and os.path.isfile(v)} or candidates
        tb = tb.tb_next
    return f" ({candidates.pop()})" if len(candidates) == 1 else ""


def _is_yaml_error(err: BaseException) -> bool:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        return False
    return isinstance(err, yaml.YAMLError)
