"""Context parallelism in the model and the train step (issue 18, "Must show").

A `context` mesh axis splits the sequence of every activation (and of the batch's token
arrays); attention runs the context-parallel op (llmjax/models/ops/context_parallel.py), and
causal stacks see their tokens in the load-balancing (zigzag) order, un-permuted before the
heads. One SGD step (lr 1: params_before - params_after is the gradient) on a context mesh
must equal the step on one device, as tests/test_parallel.py checks for data/fsdp/tensor:
loss and every gradient leaf. The op's own numerics (every context size, both strategies,
masks) are tested beside the op.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import parallel
from llmjax.config import ConfigError, MeshConfig
from llmjax.models import Transformer
from llmjax.train.experiment import build
from helpers import MeshRuns, host, initial_params, sgd_config

# (data, fsdp, tensor, expert, context)
CONTEXT4_FSDP2 = (1, 2, 1, 1, 4)
CONTEXT2_TENSOR2_DATA2 = (2, 1, 2, 1, 2)

_RUNS: list = []


def mesh_runs() -> MeshRuns:
    """The one model of this module, shared by its tests: llama-tiny (RoPE, grouped-query
    attention) trained as a prefix LM on packed rows, so every run covers the causal mask
    (load balanced: the default), packed documents crossing the context split, padding, RoPE
    positions restarting per document and the prefix LM's bidirectional prefix at once."""
    if not _RUNS:
        runs = MeshRuns("llama-tiny", "prefix_lm")
        runs.batch = pack(runs.batch)
        _RUNS.append(runs)
    return _RUNS[0]


def pack(batch: dict) -> dict:
    """The rows cut into documents of different lengths at different places, some rows ending
    in padding (segment 0, token 0); positions restart at every document."""
    rows, length = batch["tokens"].shape
    segments = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for r in range(rows):
        cuts = [0, 3 + 2 * r, 11 + r, 20 + (r % 3) * 3, length - 2 * (r % 4)]
        for doc, (start, end) in enumerate(zip(cuts, cuts[1:]), start=1):
            segments[r, start:end] = doc
            positions[r, start:end] = np.arange(end - start)
    tokens = np.where(segments > 0, batch["tokens"], 0).astype(np.int32)
    return {**batch, "tokens": tokens, "segment_ids": segments, "positions": positions}


def assert_same_step(mesh, **model):
    """One step on `mesh` (model overrides) equals the step on one device: loss, gradient
    norm and every gradient leaf, with test_parallel's tolerances."""
    runs = mesh_runs()
    segments = runs.batch["segment_ids"]
    assert (segments.max(axis=1) == 4).all() and (segments == 0).any()  # packed, padded
    _, ref_state, ref = runs.run((1, 1, 1))
    exp, state, got = runs.run(mesh, **model)
    assert exp.mesh.shape["context"] == mesh[4]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(got["tokens"], ref["tokens"])
    np.testing.assert_allclose(got["lm_accuracy"], ref["lm_accuracy"], rtol=1e-6)
    ref_grads = jax.tree.map(np.subtract, runs.params0, host(ref_state.params))
    grads = jax.tree.map(np.subtract, runs.params0, host(state.params))
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5 * scale, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    assert float(ref["grad_norm"]) > 0.1


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_context4_fsdp2_step_matches_one_device(strategy):
    assert_same_step(CONTEXT4_FSDP2, context_parallel=strategy)


def test_context2_tensor2_data2_step_matches_one_device():
    assert_same_step(CONTEXT2_TENSOR2_DATA2)


def test_no_dense_mask_under_context_parallelism():
    """The traced forward under a context mesh holds no [.., t, t] array (the dense mask of
    make_mask, or whole score matrices); the same model on one device does."""
    cfg = sgd_config("llama-tiny", "clm").model
    t = 96  # not d_model (64): hidden states [b, t, d] are not square
    inputs = {"tokens": jnp.zeros((8, t), jnp.int32)}
    square = re.compile(rf"\[[0-9,]*{t},{t}\]")

    def traced(mesh_cfg, devices):
        mesh = parallel.make_mesh(mesh_cfg, devices)
        params = jax.eval_shape(lambda: initial_params(cfg))
        with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
            return str(jax.make_jaxpr(
                lambda p: Transformer(cfg).apply({"params": p}, **inputs))(params))

    assert square.search(traced(MeshConfig(data=1), jax.devices()[:1]))
    assert not square.search(traced(MeshConfig(data=1, fsdp=2, context=4), jax.devices()))


def test_batch_token_arrays_split_over_context():
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=2, context=4), jax.devices())
    sh = parallel.batch_shardings(mesh, ["tokens", "segment_ids", "labels"])
    P = jax.sharding.PartitionSpec
    assert sh["tokens"].spec == P(parallel.BATCH_AXES, "context")
    assert sh["segment_ids"].spec == P(parallel.BATCH_AXES, "context")
    assert sh["labels"].spec == P(parallel.BATCH_AXES)
    assert parallel._spec_for(("batch", "length", "embed"), (8, 32, 64), mesh,
                              parallel.DEFAULT_RULES, "x") == P(("fsdp",), "context", None)


# ------------------------------------------------------------------ config errors


def test_context_must_divide_seq_len(no_compiles):
    with pytest.raises(ConfigError, match=r"mesh\.context=3 must divide train\.seq_len=32"):
        sgd_config("gpt-tiny", "clm", (1, 1, 1, 1, 3))
    # Load balancing cuts the sequence into 2 * context chunks.
    with pytest.raises(ConfigError, match=r"model\.context_load_balance.*2 \* mesh\.context = 16"):
        sgd_config("gpt-tiny", "clm", (1, 1, 1, 1, 8), train={"seq_len": 40})
    sgd_config("gpt-tiny", "clm", (1, 1, 1, 1, 8), train={"seq_len": 40},
               model={"context_load_balance": False})
    # A -1 context axis is checked once the mesh is resolved, before anything compiles.
    cfg = sgd_config("gpt-tiny", "clm", (1, 1, 1, 1, -1), train={"seq_len": 36})
    with pytest.raises(ConfigError, match=r"mesh\.context=8 must divide train\.seq_len=36"):
        build(cfg, devices=jax.devices())


@pytest.mark.parametrize("preset,objective,model,key", [
    ("t5-tiny", "span_corruption", {}, r"model\.architecture=encoder_decoder"),
    ("gpt-tiny", "clm", {"position": "relative"}, r"model\.position=relative"),
    ("gpt-tiny", "clm", {"attention_dropout": 0.1}, r"model\.attention_dropout=0\.1"),
])
def test_models_the_op_cannot_run(no_compiles, preset, objective, model, key):
    with pytest.raises(ConfigError, match=rf"mesh\.context=2 cannot run this model: {key}"):
        sgd_config(preset, objective, (4, 1, 1, 1, 2), model=model)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_and_prefix_tuning_refused(no_compiles, method):
    from llmjax.config import from_dict
    cfg = sgd_config("gpt-tiny", "clm", (4, 1, 1, 1, 1)).to_dict()
    cfg["mesh"]["context"], cfg["peft"]["method"] = 2, method
    with pytest.raises(ConfigError, match=rf"mesh\.context=2 cannot run peft\.method={method}"):
        from_dict(cfg)
    # The model-level check in build (PEFT's hooks set) says the same with the mesh resolved.
    cfg["mesh"]["context"], cfg["mesh"]["data"] = -1, 4
    with pytest.raises(ConfigError, match=r"mesh\.context=2 cannot run this model"):
        build(from_dict(cfg), devices=jax.devices())
