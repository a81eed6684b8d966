"""A training run whose data_dir, text files and tokenizer are all on the GCS server (the
dataset `llmjax data prepare` built there by conftest's `prepared` fixture): preflight,
the text source and the tokenizer read the bucket, and the run trains. Its own module because
the compile makes it a `slow` one (~20-40 s on 2 cores)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llmjax import config, metrics_files

REPO = Path(__file__).resolve().parents[1]


def test_a_run_trains_from_a_bucket_data_dir(prepared, tmp_path, monkeypatch):
    from llmjax.train.trainer import train

    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "fresh-cache"))  # nothing mirrored yet
    cfg = config.load(REPO / "configs/experiments/gpt-tiny.yaml", [
        "data.source=text", f"data.paths=[{prepared['text']}]", "data.validation_fraction=0.3",
        "data.document_unit=paragraph", f"data.data_dir={prepared['data_dir']}",
        f"data.tokenizer={prepared['tok']}",
        # test_run_safety's shapes and schedule: the session's compilation cache may hold the step
        "train.steps=6", "train.seq_len=32", "train.batch_size=8", "train.log_every=1",
        f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.eval_steps=1",
        "train.compilation_cache=", "mesh.data=-1", "checkpoint.every=0", "checkpoint.keep=10",
        "train.plot=false"])
    result = train(cfg)
    assert result.exit_code == 0
    losses = [r["loss"] for r in metrics_files.read_rows(tmp_path / "run") if r["split"] == "train"]
    assert len(losses) == 6 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (tmp_path / "fresh-cache" / "remote" / "gs" / "llmjax-test").is_dir()  # read via the mirror
