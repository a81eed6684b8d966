"""Every shipped experiment config loads, validates, and builds its PEFT plan, model and
objective from shapes alone (no compile, no devices), so no config in configs/ can rot.

Configs that read labelled files get small stand-in files at the paths they name (with as many
labels as the config's classifier head has); every other input is checked by preflight when a
run starts, not here.
"""
from __future__ import annotations

from pathlib import Path

import jax
import pytest
import yaml

from llmjax import config, objectives, peft
from llmjax.data.labelled import check_num_labels
from llmjax.data.tokenizer import SpecialTokens
from llmjax.models.api import abstract_params

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs/experiments").glob("*.yaml"))


def _labelled_stand_ins(raw: dict) -> None:
    """CSV files (text, label) at the config's train/validation paths, relative to the cwd."""
    data, model = raw.get("data") or {}, raw.get("model") or {}
    labels = [f"class_{i}" for i in range(int(model.get("num_labels", 2)))]
    for key in ("train_files", "validation_files"):
        for pattern in ([data[key]] if isinstance(data.get(key), str) else data.get(key) or []):
            path = Path(pattern)
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [f"example {i} of {label},{label}" for i in range(4) for label in labels]
            path.write_text("text,label\n" + "\n".join(rows) + "\n")


def test_every_experiment_is_checked():
    assert len(EXPERIMENTS) >= 20 and ROOT / "configs/experiments/gpt-tiny.yaml" in EXPERIMENTS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_builds_its_model_and_objective(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if (raw.get("data") or {}).get("source") == "labelled":
        _labelled_stand_ins(raw)
    cfg = config.load(path)
    plan = peft.build(cfg.peft)
    model_cfg = plan.model_config(cfg.model)
    check_num_labels(cfg.data, model_cfg)
    params = abstract_params(model_cfg, boxed=False)
    assert all(leaf.size > 0 for leaf in jax.tree.leaves(params))
    objective = objectives.build(cfg.objective, model_cfg, SpecialTokens())
    assert objective.batch_kind
