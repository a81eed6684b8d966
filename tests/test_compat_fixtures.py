"""Checkpoints and exports written before the checkpoint package refactor (issue 14) still
load through the public paths: resume, train.init_from, from_pretrained, load_params, the
adapter loader and `peft merge`.

The files in tests/data/pre_refactor/ were written once by make_fixture.py there (a 2-step
tiny GPT run, its parameter export, a 1-step LoRA run on that export with its adapter);
values.json holds each leaf's sum and sum of |x| as the trainer held them in memory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import config
from llmjax.tree import flatten

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests/data/pre_refactor"
VALUES = json.loads((FIXTURE / "values.json").read_text())
EXPERIMENT = REPO / "configs/experiments/gpt-tiny.yaml"


def assert_tree_matches(tree, recorded: dict, what: str, cast: bool = False) -> None:
    """Same leaves, shapes and (unless `cast`) dtypes; sums within float32 rounding."""
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(tree).items()}
    assert sorted(flat) == sorted(recorded), (what, sorted(set(flat) ^ set(recorded)))
    for key, (shape, dtype, total, total_abs) in recorded.items():
        value = flat[key]
        assert list(value.shape) == shape, (what, key)
        if not cast:
            assert str(value.dtype) == dtype, (what, key)
        as64 = value.astype(np.float64)
        np.testing.assert_allclose(as64.sum(), total, rtol=1e-6, atol=1e-6, err_msg=f"{what} {key}")
        np.testing.assert_allclose(np.abs(as64).sum(), total_abs, rtol=1e-6, err_msg=f"{what} {key}")


def run_config(run_dir, *extra):
    return config.load(EXPERIMENT, VALUES["common"] + VALUES["run"] +
                       [f"train.run_dir={run_dir}", *extra])


def copy(name: str, tmp_path) -> Path:
    """A private copy: resuming writes into the run directory."""
    return Path(shutil.copytree(FIXTURE / name, tmp_path / name))


@pytest.fixture(scope="module")
def exp():
    from llmjax.train.experiment import build
    return build(run_config(FIXTURE / "run"))


def restore(cfg, exp):
    from llmjax.checkpoint import TrainCheckpoints
    from llmjax.train.resume import restore_or_init
    ckpt = TrainCheckpoints(cfg.train.run_dir, cfg)
    try:
        return restore_or_init(cfg, exp, ckpt, exp.state_shardings())
    finally:
        ckpt.close()


def test_train_checkpoint_resumes(tmp_path, exp):
    run = copy("run", tmp_path)
    cfg = run_config(run, "train.steps=3")
    state, data_state, resumed, report = restore(cfg, exp)
    assert resumed == 2 and report is None
    assert int(jax.device_get(state.step)) == VALUES["run_state"]["step"] == 2
    assert data_state["batches"] == 2
    recorded = VALUES["run_state"]
    assert_tree_matches(state.params, recorded["params"], "params")
    assert_tree_matches(state.opt_state, recorded["opt_state"], "opt_state")
    assert_tree_matches(state.frozen, recorded["frozen"], "frozen")


def test_training_continues_from_the_old_checkpoint(tmp_path):
    from llmjax.train.trainer import train
    run = copy("run", tmp_path)
    result = train(run_config(run, "train.steps=3"))
    assert result.resumed_from == 2 and result.step == 3 and result.checkpoint_step == 3


@pytest.mark.parametrize("source", ["run", "export"])
def test_init_from_an_old_run_or_export(tmp_path, exp, source):
    cfg = run_config(tmp_path / "new", f"train.init_from={FIXTURE / source}")
    state, data_state, resumed, report = restore(cfg, exp)
    assert resumed is None and data_state is None and not report.new and not report.dropped
    assert int(jax.device_get(state.step)) == 0
    assert_tree_matches(state.params, VALUES["run_state"]["params"], "params")


def test_parameter_export_loads():
    from llmjax.checkpoint import load_params, read_config
    params, cfg = load_params(FIXTURE / "export")
    assert_tree_matches(params, VALUES["run_state"]["params"], "export")
    assert cfg == read_config(FIXTURE / "export")
    assert cfg["model"]["d_model"] == 32 and cfg["exported_from"]["step"] == 2


@pytest.mark.parametrize("source", ["run", "export"])
def test_from_pretrained(source):
    import llmjax
    model = llmjax.from_pretrained(FIXTURE / source)
    assert model.config.d_model == 32 and model.config.vocab_size == 128
    assert_tree_matches(model.params, VALUES["run_state"]["params"], source)


def test_lora_run_resumes_with_its_base_reference(tmp_path, exp):
    run = copy("lora_run", tmp_path)
    cfg = config.load(EXPERIMENT, VALUES["common"] + VALUES["lora"] + [
        f"train.run_dir={run}", f"train.init_from={FIXTURE / 'export'}", "train.steps=2"])
    from llmjax.train.experiment import build
    state, _, resumed, _ = restore(cfg, build(cfg))
    assert resumed == 1
    assert_tree_matches(state.params, VALUES["lora_state"]["params"], "lora params")
    assert_tree_matches(state.frozen, VALUES["lora_state"]["frozen"], "lora frozen")


def test_adapter_loads_and_merges(tmp_path):
    from llmjax import peft
    from llmjax.checkpoint import load_params
    adapter, peft_cfg, stored = peft.load_adapter(FIXTURE / "lora_run/adapter")
    assert peft_cfg.method == "lora" and peft_cfg.rank == 2
    assert_tree_matches(adapter, VALUES["lora_state"]["params"], "adapter")
    out = peft.merge_checkpoint(FIXTURE / "lora_run/adapter", tmp_path / "merged",
                                base_dir=FIXTURE / "export")
    merged, _ = load_params(out)
    # Independent merge: W + (alpha / r) A B on the recorded base, by numpy.
    base, _ = load_params(FIXTURE / "export")
    flat_base, flat_adapter, flat_merged = flatten(base), flatten(adapter), flatten(merged)
    assert sorted(flat_merged) == sorted(flat_base)
    scale = peft_cfg.alpha / peft_cfg.rank
    for key, value in flat_base.items():
        expected = np.asarray(value)
        if key + "/lora_a" in flat_adapter:
            a = np.asarray(flat_adapter[key + "/lora_a"])
            b = np.asarray(flat_adapter[key + "/lora_b"])
            layers, rank = a.shape[0], a.shape[-1]  # [L, in, r] @ [L, r, out...]
            delta = np.matmul(a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
            expected = expected + scale * delta.reshape(expected.shape)
        np.testing.assert_allclose(np.asarray(flat_merged[key]), expected, atol=1e-6,
                                   err_msg=key)
