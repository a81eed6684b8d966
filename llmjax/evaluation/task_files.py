"""Task specs for lm-evaluation-harness: a bundled task name or a local YAML file in lm-eval's
task format, resolved and checked (the task file and its local data files exist) without
importing lm_eval, so a run can check `eval.tasks` before it trains."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmjax.errors import ConfigError, MissingInputError

BUNDLED_TASKS = Path(__file__).parent / "tasks"


def bundled_tasks() -> list[str]:
    return sorted(p.stem for p in BUNDLED_TASKS.glob("*.yaml"))


def load_task(spec: str, registry: bool = True) -> Any:
    """A task for lm-eval: the config dict of a YAML file (local data_files resolved next to
    it and checked) or of a bundled task; any other name is returned as is for lm-eval's own
    registry, or, with registry=False (training: no downloads), is a ConfigError."""
    import yaml

    path = Path(spec)
    if not path.suffix and (BUNDLED_TASKS / f"{spec}.yaml").exists():
        path = BUNDLED_TASKS / f"{spec}.yaml"
    if path.suffix not in (".yaml", ".yml"):
        if registry:
            return spec
        raise ConfigError(f"task {spec!r} is neither a bundled task ({', '.join(bundled_tasks())}) "
                          f"nor a task YAML file (lm-eval's format, local data_files); "
                          f"lm-eval's own tasks download data: run them with llmjax eval-tasks")
    if not path.exists():
        raise MissingInputError(f"task file {path} does not exist; pass a task YAML file, a "
                                f"bundled task ({', '.join(bundled_tasks())}) or an lm-eval "
                                f"task name")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or "task" not in config:
        raise ConfigError(f"{path}: not an lm-eval task config (a mapping with a `task:` name)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        resolved = {}
        for split, name in (files.items() if isinstance(files, dict) else [("train", files)]):
            local = (path.parent / name) if not Path(name).is_absolute() else Path(name)
            if not local.exists():
                raise MissingInputError(f"task {config['task']} ({path}) names data file "
                                        f"{name} for split {split!r}, which does not exist "
                                        f"(looked for {local})")
            resolved[split] = str(local)
        config["dataset_kwargs"] = dict(config["dataset_kwargs"], data_files=resolved)
    return config
