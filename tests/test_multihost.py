"""Multi-host training with real processes: two local processes of 4 CPU devices each, joined
by jax.distributed on 127.0.0.1, train exactly like one process with 8 devices (each host
feeds only its own rows of the global batch; checkpoints are written by both)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import xla_flags

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["-m", "llmjax", "train", str(ROOT / "configs/experiments/gpt-tiny.yaml"),
        "train.steps=3", "train.log_every=1", "train.batch_size=16", "train.seq_len=32",
        "train.progress=false", "train.tensorboard=false", "mesh.data=-1"]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMJAX_")}
    env.update(XLA_FLAGS=xla_flags(devices),
               JAX_PLATFORMS="cpu", **extra)
    return env


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_process_with_all_devices(tmp_path):
    cache = f"train.compilation_cache={tmp_path / 'jax'}"
    single = subprocess.run([sys.executable, *ARGS, f"train.run_dir={tmp_path / 'one'}", cache],
                            env=_env(8), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]

    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, *ARGS, f"train.run_dir={tmp_path / 'two'}", cache],
        env=_env(4, LLMJAX_COORDINATOR=f"127.0.0.1:{port}", LLMJAX_NUM_PROCESSES="2",
                 LLMJAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:]

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=1e-6)
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir()
