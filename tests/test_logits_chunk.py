"""train.logits_chunk: the LM head + cross-entropy applied a chunk of positions at a time
gives the whole-logits step's loss, metrics and gradients (one SGD lr-1 step, so the
parameter change is the gradient), on one device and sharded, and holds less memory."""
import dataclasses
import math

import jax
import numpy as np
import pytest

from llmjax import parallel
from llmjax.config import ConfigError
from llmjax.data.device import to_global
from llmjax.data.pipeline import make_iterator
from llmjax.train.experiment import build
from helpers import FAST_COMPILE, close_trees, compiled_step, fast_init, host, sgd_config


def one_step(preset, objective, chunk, mesh=(1, 1, 1), objective_cfg=None):
    cfg = sgd_config(preset, objective, mesh, train={"logits_chunk": chunk})
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective,
                                                                 **(objective_cfg or {})))
    exp = build(cfg, devices=jax.devices()[:math.prod(mesh)])
    batch = next(make_iterator(exp.config.data, exp.objective.batch_kind, 32, 8,
                               vocab_size=exp.config.model.vocab_size))
    state = fast_init(exp)
    params0 = host(state.params)
    global_batch = to_global(batch, parallel.batch_sharding(exp.mesh))
    evaluated = host(exp.eval_step(batch.keys())(state, global_batch))
    new, metrics = compiled_step(exp, exp.state_shardings(), batch)(state, global_batch)
    grads = jax.tree.map(np.subtract, params0, host(new.params))
    return host(metrics), grads, evaluated


@pytest.mark.parametrize("preset,objective,chunk,extra", [
    # 32 positions in chunks of 12: the last chunk is padded with weight-0 positions
    ("gpt-tiny", "clm", 12, {"z_loss": 1e-3, "label_smoothing": 0.1}),
    ("llama-tiny", "prefix_lm", 8, {}),  # untied head
    ("t5-tiny", "span_corruption", 4, {}),  # encoder-decoder: the decoder's head
])
def test_chunked_head_equals_whole_logits(preset, objective, chunk, extra):
    ref, ref_grads, ref_eval = one_step(preset, objective, 0, objective_cfg=extra)
    got, grads, got_eval = one_step(preset, objective, chunk, objective_cfg=extra)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, atol=1e-7, err_msg=key)
    close_trees(ref_grads, grads, 1e-5)
    for name in ref_eval:
        np.testing.assert_allclose(got_eval[name], ref_eval[name], rtol=2e-5, err_msg=name)
    assert float(ref["grad_norm"]) > 0.1


def test_chunked_head_sharded_equals_single_device_whole():
    ref, ref_grads, _ = one_step("gpt-tiny", "clm", 0)
    got, grads, _ = one_step("gpt-tiny", "clm", 8, mesh=(2, 2, 2))
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    close_trees(ref_grads, grads, 1e-5)


def test_chunking_shrinks_the_compiled_temporaries():
    """vocab 8192, batch 8 x seq 128: whole logits are 32 MiB (and their gradient as much)."""
    def temp_bytes(chunk):
        cfg = sgd_config("gpt-tiny", "clm", model={"vocab_size": 8192},
                     train={"logits_chunk": chunk, "seq_len": 128})
        exp = build(cfg, devices=jax.devices()[:1])
        spec = {"tokens": jax.ShapeDtypeStruct((8, 128), np.int32),
                "segment_ids": jax.ShapeDtypeStruct((8, 128), np.int32)}
        step = exp.train_step(spec.keys())
        compiled = step.lower(exp.abstract_state(), spec).compile(FAST_COMPILE)
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(16)
    assert chunked < 0.5 * whole, (whole, chunked)


def test_bad_logits_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match="train.logits_chunk=-1"):
        build(sgd_config("gpt-tiny", "clm", train={"logits_chunk": -1}), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match="MLM head"):
        build(sgd_config("bert-tiny", "mlm", train={"logits_chunk": 8}), devices=jax.devices()[:1])
