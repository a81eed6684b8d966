"""Every PEFT method on every family, sharded on a (2,2,2) mesh: the same losses as on one
device, optimizer state only for trainable leaves, frozen leaves bit-identical after steps.

Compiles dominate on CPU, so each family runs ONE composed plan holding every method that
applies to it (the methods compose with '+': their trainable sets are disjoint leaves of one
tree and their transforms apply in order), rather than one compile pair per method.
"""
import jax
import numpy as np
import pytest

from llmjax.config import from_dict
from llmjax.data.device import to_global
from llmjax.data.pipeline import make_iterator
from llmjax.tree import flatten_parts
from llmjax.train.experiment import build

ALL = "lora+ia3+adapters+prompt_tuning+prefix_tuning+ffn_only"
FAMILIES = {  # preset: (objective, methods that apply)
    "gpt-tiny": ("clm", ALL + "+bitfit"),
    "bert-tiny": ("mlm+nsp", ALL + "+bitfit"),
    "t5-tiny": ("span_corruption", ALL),
    "palm-tiny": ("clm", ALL),
    "llama-tiny": ("prefix_lm", ALL),
}
STEPS = 2


def _run(family, mesh, state=None):
    objective, method = FAMILIES[family]
    config = from_dict({
        "model": family, "objective": {"name": objective}, "mesh": mesh,
        "train": {"batch_size": 8, "seq_len": 32, "steps": 10},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "peft": {"method": method, "rank": 4, "num_virtual_tokens": 3, "adapter_dim": 8}})
    n = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    exp = build(config, devices=jax.devices()[:n])
    sh = exp.state_shardings()
    state = exp.init_state() if state is None else jax.device_put(state, sh)
    it = make_iterator(config.data, exp.objective.batch_kind, config.train.seq_len,
                       config.train.batch_size, vocab_size=config.model.vocab_size)
    batch = next(it)
    step = exp.train_step(batch.keys(), sh)
    batch = to_global(batch, next(iter(exp.batch_shardings(batch.keys()).values())))
    initial = jax.device_get(state)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return exp, initial, state, losses


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_sharded_matches_one_device(family):
    exp, initial, state, losses = _run(family, {"data": 2, "fsdp": 2, "tensor": 2})
    # PEFT leaves shard like their base weights (e.g. lora_b over heads -> tensor)
    specs = {"/".join(p): s.spec for p, s in flatten_parts(jax.tree.map(
        lambda x: x.sharding, state.params)).items()}
    assert specs["decoder/layers/attention/query/kernel/lora_b" if family != "bert-tiny" else
                 "encoder/layers/attention/query/kernel/lora_b"][2] == "tensor"

    _, _, state1, losses1 = _run(family, {"data": 1, "fsdp": 1, "tensor": 1}, initial)
    np.testing.assert_allclose(losses, losses1, rtol=2e-5)

    # Frozen leaves are bit-identical; every trainable leaf moved; the optimizer holds
    # moments for trainable leaves only.
    final = jax.device_get(state)
    for path, value in flatten_parts(initial.frozen).items():
        np.testing.assert_array_equal(value, flatten_parts(final.frozen)[path], err_msg=str(path))
    for path, value in flatten_parts(initial.params).items():
        assert np.any(value != flatten_parts(final.params)[path]), path
    moments = [x for x in jax.tree.leaves(final.opt_state) if np.ndim(x)]
    n_trainable = sum(np.size(x) for x in jax.tree.leaves(final.params))
    assert sum(np.size(x) for x in moments) == 2 * n_trainable
