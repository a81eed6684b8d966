"""The shipped tiny MoE experiment trains from the command line (issue 17): on its
expert=4 x data=2 mesh the loss falls and the expert-load metric shows every expert used."""
from __future__ import annotations

from pathlib import Path

from llmjax import cli
from llmjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_moe_tiny_experiment_trains_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", str(ROOT / "configs/experiments/moe-tiny.yaml"), "train.steps=40",
                     "train.seq_len=32", "train.log_every=10", "train.eval_steps=1",
                     "train.run_dir=run"]) == 0
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 4
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    for row in rows:
        assert row["expert_load_min"] > 0  # every one of the 8 experts got tokens
        assert row["router_dropped_fraction"] == 0.0  # dropless
        assert 1.0 <= row["router_balance_loss"] < 1.5
