"""Writes the compatibility fixture beside this file with the code of the day it is run
(committed once, before llmjax/checkpoint.py became a package: issue 14 part 3).

    PYTHONPATH=. python tests/data/pre_refactor/make_fixture.py

run/          a 2-step training run (tiny GPT, synthetic data): checkpoints/2 (state, data, meta)
export/       `llmjax export run export`: a parameter export (config.yaml + params/)
lora_run/     a 1-step LoRA fine-tune with train.init_from=export: its checkpoint references the
              base (peft/base_ref.py) instead of storing it; adapter/ is its adapter export
values.json   per-leaf shape, dtype, sum and sum of |x| (float64) of the trees as the trainer
              held them in memory, and the overrides the runs used

tests/test_compat_fixtures.py loads each through the public paths and compares.
Do not regenerate it after a storage change: its point is that old files still load.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from llmjax import config  # noqa: E402
from llmjax.tree import flatten  # noqa: E402

# A model small enough that the whole fixture (Adam state included) stays well under 1 MB.
MODEL = ["model.vocab_size=128", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
         "model.d_ff=64", "model.max_len=32"]
COMMON = MODEL + ["data.synthetic_vocab_size=128", "data.synthetic_num_documents=64",
                  "train.seq_len=16", "train.batch_size=8", "train.log_every=1",
                  "train.progress=false", "train.tensorboard=false", "train.plot=false",
                  "train.eval_steps=1", "train.compilation_cache=", "mesh.data=-1"]
RUN = ["train.steps=2", "checkpoint.every=2"]
LORA = ["train.steps=1", "checkpoint.every=1", "peft.method=lora", "peft.rank=2",
        "peft.alpha=4", "peft.targets=attention/(query|value)/"]


def summary(tree) -> dict:
    """{leaf: [shape, dtype, sum, sum |x|]} with float64 sums."""
    out = {}
    for key, leaf in flatten(tree).items():
        value = np.asarray(jax.device_get(leaf))
        as64 = value.astype(np.float64)
        out[key] = [list(value.shape), str(value.dtype), float(as64.sum()),
                    float(np.abs(as64).sum())]
    return out


def main() -> None:
    from llmjax.export import export_run
    from llmjax.train.trainer import train

    for name in ("run", "export", "lora_run"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    experiment = REPO / "configs/experiments/gpt-tiny.yaml"
    run = train(config.load(experiment, COMMON + RUN + [f"train.run_dir={HERE / 'run'}"]))
    assert run.checkpoint_step == 2, run
    export_run(HERE / "run", HERE / "export")
    lora = train(config.load(experiment, COMMON + LORA + [
        f"train.run_dir={HERE / 'lora_run'}", f"train.init_from={HERE / 'export'}"]))
    assert lora.checkpoint_step == 1, lora
    for run_dir in (HERE / "run", HERE / "lora_run"):
        for extra in ("metrics.jsonl", "curves.png"):
            (run_dir / extra).unlink(missing_ok=True)
    values = {
        "common": COMMON, "run": RUN, "lora": LORA,
        "run_state": {"step": int(run.state.step), "params": summary(run.state.params),
                      "opt_state": summary(run.state.opt_state),
                      "frozen": summary(run.state.frozen)},
        "lora_state": {"step": int(lora.state.step), "params": summary(lora.state.params),
                       "frozen": summary(lora.state.frozen)},
        "jax": jax.__version__,
    }
    (HERE / "values.json").write_text(json.dumps(values, indent=1) + "\n")
    size = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"fixture written: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
