"""PEFT on mixture-of-experts layers (issue 17): LoRA on the stacked experts (one low-rank pair
per expert) and the router, IA3 on the experts, the adapter-off DPO reference, a sharded LoRA
step equal to one device, and `peft merge` of an expert adapter."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import PeftConfig, from_dict
from llmjax.peft import build, merge_lora, unmerge_lora
from llmjax.peft.reference import ReferencePlan
from llmjax.tree import flatten_parts, unflatten_parts
from helpers import host, initial_params, jitted_apply

EXPERTS = "mlp/(wi_0|wi_1|wo|router)"
RANK, ALPHA = 4, 8.0
TOKENS = np.random.RandomState(0).randint(0, 512, (2, 12))


@pytest.fixture(scope="module")
def moe():
    """(model config, base params) of moe-tiny (scanned: leaves carry [L, E, ...])."""
    cfg = from_dict({"model": "moe-tiny"}).model
    return cfg, initial_params(cfg)


@pytest.fixture(scope="module")
def lora_split(moe):
    """(plan, trainable, frozen) of LoRA on the experts and the router, split once."""
    cfg, params = moe
    plan = lora_plan(cfg)
    trainable, frozen = split(plan, params)
    return plan, trainable, frozen


def lora_plan(cfg, targets=EXPERTS, **kw):
    plan = build(PeftConfig(method="lora", targets=targets, rank=RANK, alpha=ALPHA, **kw))
    plan.model_config(cfg)
    return plan


def merged(plan, trainable, frozen):
    """plan.merge, jitted (eager dispatch op by op is slow on 2 cores)."""
    return jax.jit(plan.merge)(trainable, frozen)


def logits(cfg, params):
    return np.asarray(jitted_apply(cfg)(params, {"tokens": jnp.asarray(TOKENS)})["logits"])


def split(plan, params):
    """plan.split, jitted."""
    return jax.jit(plan.split)(params, jax.random.key(1))


def randomize_b(trainable):
    """LoRA B starts at zero; random B makes the delta visible."""
    rng = np.random.RandomState(0)
    return unflatten_parts({p: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                            if p[-1] == "lora_b" else v
                            for p, v in flatten_parts(trainable).items()})


def test_lora_on_experts_is_one_pair_per_expert_and_matches_numpy(moe, lora_split):
    cfg, params = moe
    plan, trainable, frozen = lora_split
    lora = flatten_parts(trainable)
    L, E, d, f = cfg.num_layers, cfg.num_experts, cfg.d_model, cfg.expert_hidden
    shapes = {p[-2:]: v.shape for p, v in lora.items()}
    assert shapes == {("wi_0", "lora_a"): (L, E, d, RANK), ("wi_0", "lora_b"): (L, E, RANK, f),
                      ("wi_1", "lora_a"): (L, E, d, RANK), ("wi_1", "lora_b"): (L, E, RANK, f),
                      ("wo", "lora_a"): (L, E, f, RANK), ("wo", "lora_b"): (L, E, RANK, d),
                      ("router", "lora_a"): (L, d, RANK), ("router", "lora_b"): (L, RANK, E)}
    # The pairs shard like the experts: the expert axis first (after the layer axis).
    assert plan.axes(("decoder", "layers", "mlp", "wo", "lora_b"), (L, E, RANK, d)) == (
        "layers", "expert", "lora", "embed")
    assert plan.axes(("decoder", "layers", "mlp", "wi_0", "lora_a"), (L, E, d, RANK)) == (
        "layers", "expert", "embed", "lora")
    # B = 0: the model starts exactly at the base.
    np.testing.assert_array_equal(logits(cfg, merged(plan, trainable, frozen)), logits(cfg, params))

    trainable = randomize_b(trainable)
    merged_flat = flatten_parts(host(merged(plan, trainable, frozen)))
    base, lora = flatten_parts(host(params)), flatten_parts(host(trainable))
    scale = ALPHA / RANK
    for name in ("wi_0", "wi_1", "wo"):
        path = ("decoder", "layers", "mlp", name)
        a, b = lora[path + ("lora_a",)], lora[path + ("lora_b",)]
        for layer in range(L):
            for e in range(E):
                want = base[path][layer, e] + scale * a[layer, e] @ b[layer, e]
                np.testing.assert_allclose(merged_flat[path][layer, e], want, atol=1e-5)
    router = ("decoder", "layers", "mlp", "router")
    want = base[router] + scale * np.einsum("ldr,lre->lde", lora[router + ("lora_a",)],
                                            lora[router + ("lora_b",)])
    np.testing.assert_allclose(merged_flat[router], want, atol=1e-5)
    # The forward of the adapted model is the forward of the numpy-merged weights.
    flat = dict(base)
    for path in {p[:-1] for p in lora}:
        a, b = lora[path + ("lora_a",)], lora[path + ("lora_b",)]
        flat[path] = base[path] + scale * np.matmul(a, b)
    numpy_merged = unflatten_parts(flat)
    adapted = logits(cfg, merged(plan, trainable, frozen))
    np.testing.assert_allclose(adapted, logits(cfg, numpy_merged), atol=1e-5)
    assert np.abs(adapted - logits(cfg, params)).max() > 1e-3  # the delta changes the output

    # merge / unmerge round trip (peft.merge_lora folds the delta into the base leaves).
    folded = jax.jit(lambda p, t: merge_lora(p, t, plan.cfg))(params, trainable)
    for path, value in flatten_parts(host(folded)).items():
        np.testing.assert_allclose(value, merged_flat[path], atol=1e-6, err_msg=str(path))
    back = flatten_parts(host(jax.jit(lambda p, t: unmerge_lora(p, t, plan.cfg))(
        folded, trainable)))
    for path, value in base.items():
        np.testing.assert_allclose(back[path], value, atol=1e-6, err_msg=str(path))


def test_expert_adapter_reference_is_the_base(moe, lora_split):
    """DPO's adapter-off reference (objective.reference=adapter) with LoRA on experts."""
    cfg, params = moe
    plan, trainable, frozen = lora_split
    ref = ReferencePlan(plan, "adapter").reference(randomize_b(trainable), frozen)
    for path, value in flatten_parts(host(params)).items():
        np.testing.assert_array_equal(flatten_parts(host(ref))[path], value, err_msg=str(path))


def test_ia3_scales_each_experts_intermediate(moe):
    """IA3 on the experts' `wo`: one vector per expert scaling its intermediate features."""
    cfg, params = moe
    plan = build(PeftConfig(method="ia3", targets=r"mlp/wo$"))
    plan.model_config(cfg)
    trainable, frozen = split(plan, params)
    scale_path = ("decoder", "layers", "mlp", "wo", "ia3", "scale")
    (path, ones), = flatten_parts(trainable).items()
    assert path == scale_path and ones.shape == (cfg.num_layers, cfg.num_experts, cfg.expert_hidden)
    assert plan.axes(scale_path, ones.shape) == ("layers", "expert", "mlp")
    np.testing.assert_array_equal(logits(cfg, merged(plan, trainable, frozen)), logits(cfg, params))
    s = np.asarray(jax.random.uniform(jax.random.key(2), ones.shape, minval=0.5, maxval=1.5))
    merged_flat = flatten_parts(host(merged(plan, unflatten_parts({scale_path: s}), frozen)))
    wo = np.asarray(flatten_parts(params)[scale_path[:-2]])
    np.testing.assert_allclose(merged_flat[scale_path[:-2]], wo * s[..., None], rtol=1e-6)


def test_lora_targets_error_names_expert_paths(moe):
    cfg, params = moe
    from llmjax.config import ConfigError
    with pytest.raises(ConfigError, match="mlp/wi_0"):
        lora_plan(cfg, targets="nothing_here").split(params, jax.random.key(0))


def test_expert_adapter_checkpoint_and_peft_merge(moe, lora_split, tmp_path):
    """An adapter of expert LoRA pairs saved beside its base; `llmjax peft merge` writes
    W_e + scale * A_e B_e, bit-equal to the plan's merge inside the train step."""
    from llmjax import cli
    from llmjax.checkpoint import load_params, save_params
    from llmjax.peft import load_adapter, save_adapter
    cfg, params = moe
    plan, trainable, frozen = lora_split
    save_params(tmp_path / "base", params, cfg)
    trainable = randomize_b(trainable)
    save_adapter(tmp_path / "adapter", trainable, plan.cfg, cfg, base=str(tmp_path / "base"))
    loaded, _, _ = load_adapter(tmp_path / "adapter")
    assert flatten_parts(loaded).keys() == flatten_parts(trainable).keys()
    assert cli.main(["peft", "merge", str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    got, _ = load_params(tmp_path / "out")
    want = flatten_parts(host(merged(plan, trainable, frozen)))
    for path, value in flatten_parts(host(got)).items():
        np.testing.assert_array_equal(value, want[path], err_msg=str(path))


def test_qlora_quantizes_the_expert_stacks_not_the_router(moe, lora_split):
    """QLoRA (peft.base_quantization): the experts, most of an MoE model, are stored
    block-quantized with the kernels; the router stays in its dtype."""
    from llmjax.peft import quantize
    cfg, params = moe
    _, _, frozen = lora_split
    mlp = ("decoder", "layers", "mlp")
    flat = {p: v for p, v in flatten_parts(frozen).items() if p[:3] == mlp}
    stored = jax.jit(lambda f: quantize.quantize_flat(f, "nf4", 64))(flat)
    for name in ("wi_0", "wi_1", "wo"):
        assert mlp + (name, quantize.CODES) in stored and mlp + (name,) not in stored
    assert mlp + ("router",) in stored
    back = jax.jit(lambda f: quantize.dequantize_flat(f, "nf4", 64))(stored)
    for name in ("wi_0", "wo"):
        w = np.asarray(flat[mlp + (name,)])
        err = np.abs(np.asarray(back[mlp + (name,)]) - w).reshape(-1, 64).max(1)
        assert np.all(err <= quantize.max_error_bound("nf4") * np.abs(w).reshape(-1, 64).max(1)
                      + 1e-7)
