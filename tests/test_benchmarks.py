"""The prepared accelerator check (benchmarks/gpu_mfu.py) must run when a session finally has
a GPU: smoke-test it here on CPU with its tiny model."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_mfu_script_runs_tiny_on_cpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_mfu.py"), "--tiny", "--torch", "none",
         "--variants", "xla", "--steps", "2", "--warmup", "1", "--batch", "2"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| llmjax")]
    assert len(rows) == 1, result.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[2]) > 0 and int(cells[3].replace(",", "")) > 0  # step ms, tokens/s
