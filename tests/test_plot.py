"""`llmjax plot`: PNG training curves from metrics.jsonl, tolerant of NaN, nulls, missing keys."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llmjax import cli
from llmjax.config import ConfigError
from llmjax.plot import plot_runs, read_metrics, series


def _write_run(run_dir, records, tail=""):
    run_dir.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]  # json writes float('nan') as NaN, as the trainer does
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    return run_dir


@pytest.fixture
def runs(tmp_path):
    a = _write_run(tmp_path / "a", [
        {"step": s, "split": "train", "loss": 5.0 / s, "learning_rate": 1e-3 * s,
         "tokens_per_second": 1000.0 + s} for s in range(1, 6)] + [
        {"step": 5, "split": "eval", "loss": 1.5},
        {"step": 6, "split": "train", "loss": float("nan"), "learning_rate": None},
    ], tail='{"step": 7, "split": "tr')  # a line cut short by a kill
    b = _write_run(tmp_path / "b", [{"step": s, "split": "train", "loss": 4.0 / s}
                                    for s in range(1, 4)])  # no eval, lr or tokens/s
    return a, b


def _image(path):
    from matplotlib.image import imread
    return imread(path)


def test_series_skips_nan_null_missing_and_truncated_lines(runs):
    records = read_metrics(runs[0])
    assert len(records) == 7  # the truncated last line is skipped
    steps, losses = series(records, "train", "loss")
    assert steps == [1, 2, 3, 4, 5] and losses[0] == 5.0  # step 6's NaN left out
    assert series(records, "train", "learning_rate")[0] == [1, 2, 3, 4, 5]  # null left out
    assert series(records, "eval", "loss") == ([5.0], [1.5])
    assert series(read_metrics(runs[1]), "train", "tokens_per_second") == ([], [])


def test_plot_runs_writes_a_png_overlaying_runs(runs, tmp_path):
    out = plot_runs(runs, tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = _image(out)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert np.ptp(pixels[..., :3]) > 0.5  # something was drawn, not a blank canvas


def test_plot_command_defaults_to_the_first_run_dir(runs, capsys):
    assert cli.main(["plot", str(runs[0]), str(runs[1])]) == 0
    assert (runs[0] / "curves.png").is_file()
    assert "curves.png" in capsys.readouterr().out
    assert _image(runs[0] / "curves.png").size > 0


def test_plot_errors_name_the_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        plot_runs([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no metrics.jsonl"):
        plot_runs([tmp_path / "empty"])
