"""The checkpoint storage package without a training run (no compile, milliseconds): paths
stay URLs, step listing, and the integrity check resume relies on (on the committed
pre-refactor fixture, and copies of it damaged as a cut-off save leaves them)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmjax.checkpoint.integrity import step_problem
from llmjax import paths
from llmjax.checkpoint.location import step_numbers

FIXTURE = Path(__file__).resolve().parent / "data/pre_refactor"


def as_path(path):
    return paths.absolute(path, check_bucket=False)


def test_urls_stay_urls_and_local_paths_become_absolute(monkeypatch, tmp_path):
    assert str(as_path("gs://bucket/run") / "checkpoints" / "4") == "gs://bucket/run/checkpoints/4"
    assert str(as_path("s3://bkt/x").parent) == "s3://bkt"
    monkeypatch.chdir(tmp_path)
    assert str(as_path("runs/a")) == str(tmp_path / "runs/a")
    assert not Path("gs:").exists()


def test_steps_are_numbered_directories_only(tmp_path):
    for name in ("2", "10", "4.orbax-checkpoint-tmp-123", "notes"):
        (tmp_path / name).mkdir()
    assert step_numbers(as_path(tmp_path)) == [2, 10]
    assert step_numbers(as_path(tmp_path / "absent")) == []


@pytest.mark.parametrize("remove,named", [
    (None, None),
    ("commit_success.txt", "commit_success.txt is missing (the save never committed)"),
    ("_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA is missing (the save never committed)"),
    ("meta/metadata", "meta/metadata is missing"),
    ("data/process_0.json", "data/process_0.json is missing"),
    ("state/_METADATA", "state/_METADATA is missing"),
    ("state/manifest.ocdbt", "state/manifest.ocdbt is missing"),
    ("state/ocdbt.process_0/manifest.ocdbt", "state/ocdbt.process_0/manifest.ocdbt is missing"),
])
def test_integrity_names_the_missing_file(tmp_path, remove, named):
    step = Path(shutil.copytree(FIXTURE / "run/checkpoints/2", tmp_path / "2"))
    if remove:
        (step / remove).unlink()
    problem = step_problem(as_path(step))
    assert problem == (f"{step / named}" if named else None)


def test_integrity_names_a_truncated_json_file(tmp_path):
    step = Path(shutil.copytree(FIXTURE / "run/checkpoints/2", tmp_path / "2"))
    meta = step / "meta" / "metadata"
    meta.write_text(meta.read_text()[:50])
    assert step_problem(as_path(step)).startswith(f"{meta} is truncated or not JSON")
