"""Mixture of experts on 8 devices (issue 17): one train step on expert-parallel meshes equals
one device (loss, router metrics, every gradient leaf), and the shipped tiny MoE experiment
trains from the command line on its expert=4 x data=2 mesh: the loss falls and the
expert-load metric shows every expert used; gradient accumulation is exact."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import cli
from llmjax.metrics import read_metrics
from llmjax.train.experiment import build
from helpers import MeshRuns, compiled_step, host, sgd_config

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ expert-parallel meshes

# (data, fsdp, tensor, expert), as tests/helpers.sgd_config reads them.
MOE_MESHES = [(1, 1, 1, 8), (2, 1, 1, 4), (1, 2, 2, 2)]


@pytest.fixture(scope="module")
def moe_runs():
    # Dense dispatch with room for every token: exactly the same function on every mesh.
    return MeshRuns("moe-tiny", "clm", model={"moe_impl": "dense", "capacity_factor": 4.0})


@pytest.mark.parametrize("mesh", MOE_MESHES, ids=lambda m: "x".join(map(str, m)))
def test_expert_parallel_step_matches_single_device(moe_runs, mesh):
    _, ref_state, ref = moe_runs.run((1, 1, 1))
    exp, state, got = moe_runs.run(mesh)
    assert exp.mesh.shape["expert"] == mesh[3]
    for key in ("loss", "grad_norm", "router_balance_loss", "router_z_loss"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    for key in ("expert_load_min", "expert_load_max", "router_dropped_fraction"):
        assert got[key] == ref[key], key
    assert float(ref["router_dropped_fraction"]) == 0.0
    assert float(ref["expert_load_min"]) > 0  # every expert gets tokens
    ref_grads = jax.tree.map(np.subtract, moe_runs.params0, host(ref_state.params))
    grads = jax.tree.map(np.subtract, moe_runs.params0, host(state.params))
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5 * scale, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    # The experts are split over the expert axis.
    wi = state.params["decoder"]["layers"]["mlp"]["wi_0"]
    assert "expert" in str(wi.sharding.spec)


def test_lora_on_experts_sharded_step_matches_single_device():
    """LoRA on the experts and the router (peft/lora.py: one pair per expert) on expert=2 x
    fsdp=2 x tensor=2: the loss and every LoRA leaf after one SGD step equal one device, and
    the per-expert pairs are split over the expert axis like the experts."""
    runs = MeshRuns("moe-tiny", "clm", model={"moe_impl": "dense", "capacity_factor": 4.0},
                    peft={"method": "lora", "targets": "mlp/(wi_0|wi_1|wo|router)", "rank": 4})
    # B starts at zero (so A's gradient is zero): a random B makes both factors move.
    rng = np.random.RandomState(0)
    runs.init = runs.init.replace(params=jax.tree_util.tree_map_with_path(
        lambda p, v: (0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
        if jax.tree_util.keystr(p).endswith("'lora_b']") else v, runs.init.params))
    _, ref_state, ref = runs.run((1, 1, 1))
    _, state, got = runs.run((1, 2, 2, 2))
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    ref_params, params = host(ref_state.params), host(state.params)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref_params, runs.init.params)
    assert min(jax.tree.leaves(moved)) > 0  # every LoRA factor trained
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(g, r, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    mlp = state.params["decoder"]["layers"]["mlp"]
    assert mlp["wi_0"]["lora_a"].sharding.spec[:2] == (None, "expert")
    assert state.frozen["decoder"]["layers"]["mlp"]["wi_0"].sharding.spec[1] == "expert"



def test_moe_tiny_experiment_trains_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", str(ROOT / "configs/experiments/moe-tiny.yaml"), "train.steps=30",
                     "train.seq_len=32", "train.log_every=10", "train.eval_steps=1",
                     "train.run_dir=run"]) == 0
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 3
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    for row in rows:
        assert row["expert_load_min"] > 0  # every one of the 8 experts got tokens
        assert row["router_dropped_fraction"] == 0.0  # dropless
        assert 1.0 <= row["router_balance_loss"] < 1.5


def test_gradient_accumulation_is_exact_for_the_lm_loss():
    """Two accumulated micro-batches equal one full batch (the router losses are nonlinear in
    the batch, f_i * P_i, so they are weighted 0 here; the load metric still adds up)."""
    model = {"moe_impl": "dense", "capacity_factor": 4.0, "router_balance_weight": 0.0,
             "router_z_weight": 0.0}
    one = MeshRuns("moe-tiny", "clm", model=model)
    _, ref_state, ref = one.run((1, 1, 1))
    exp = build(sgd_config("moe-tiny", "clm", model=model, train={"grad_accum": 2}),
                devices=jax.devices()[:1])
    sh = exp.state_shardings()
    state = jax.device_put(one.init, sh)
    state = state.replace(rng=jax.random.wrap_key_data(state.rng, impl=one.key_impl))
    new, got = compiled_step(exp, sh, one.batch)(state, one.batch)
    got = host(got)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["expert_load_max"], ref["expert_load_max"], rtol=1e-6)
    np.testing.assert_allclose(got["expert_load_min"], ref["expert_load_min"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(host(new.params)), jax.tree.leaves(host(ref_state.params))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_kv_cache_generation_equals_full_forward_argmax():
    """Greedy decoding with the KV cache (router per new token) = argmax of full forwards."""
    import jax.numpy as jnp
    from llmjax.config import from_dict
    from llmjax.generate import generate
    from llmjax.models import Transformer, init_params
    cfg = from_dict({"model": {"preset": "moe-tiny", "max_len": 16}}).model
    params = jax.jit(lambda: init_params(cfg, jax.random.key(0)))()
    got = generate(cfg, params, [[5, 6, 7, 8]], max_new_tokens=4)[0]
    forward = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)["logits"])
    want = [5, 6, 7, 8]
    for _ in range(4):
        want.append(int(jnp.argmax(forward(params, jnp.asarray([want + [0] * (8 - len(want))]))[
            0, len(want) - 1])))
    assert got == want[4:]
