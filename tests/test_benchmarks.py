"""The prepared accelerator check (benchmarks/gpu_mfu.py) must run when a session finally has
a GPU: smoke-test it here on CPU with its tiny model, with and without a working PyTorch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_gpu_mfu(*args: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_mfu.py"), "--tiny", "--variants", "xla",
         "--steps", "2", "--warmup", "1", "--batch", "2", *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **env))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(out: str, prefix: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith(f"| {prefix}")]


def test_gpu_mfu_script_runs_tiny_on_cpu():
    (cells,) = table_rows(run_gpu_mfu("--torch", "none"), "llmjax")
    assert float(cells[2]) > 0 and int(cells[3].replace(",", "")) > 0  # step ms, tokens/s


def test_gpu_mfu_torch_baseline_and_its_failure(tmp_path):
    pytest.importorskip("torch")
    out = run_gpu_mfu("--torch", "eager")
    (llmjax,), (torch,) = table_rows(out, "llmjax"), table_rows(out, "torch (eager)")
    assert torch[-1] == "1.00x" and float(llmjax[-1].rstrip("x")) > 0
    # A PyTorch that breaks (here: on import) costs only its own row, never llmjax's.
    (tmp_path / "torch.py").write_text("raise RuntimeError('this torch is broken')\n")
    out = run_gpu_mfu("--torch", "compile", PYTHONPATH=str(tmp_path))
    assert "torch (compile): failed" in out and "torch (eager): failed" in out
    assert "this torch is broken" in out
    assert len(table_rows(out, "llmjax")) == 1 and not table_rows(out, "torch")
