"""PEFT transforms: zero-init, prompt positions, LoRA merge/unmerge, IA3 math, masks,
config errors, summary counts, adapter-only checkpoints, optimizer-state bytes.
(Sharded training of every method on every family: test_peft_sharded.py.)"""
import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import peft
from llmjax.config import ConfigError, from_dict, model_config
from llmjax.models.api import init_params
from llmjax.peft import PeftConfig
from llmjax.peft.lora import merge_lora, unmerge_lora
from llmjax.tree import flatten_parts, unflatten_parts
from helpers import initial_params, jitted_apply

HOOK_LEAVES = ("prompt", "prefix_key", "prefix_value")


def _inputs(cfg, batch=2, length=12, seed=3):
    tokens = jax.random.randint(jax.random.key(seed), (batch, length), 5, cfg.vocab_size)
    segments = jnp.ones_like(tokens).at[1, -3:].set(0)  # row 1 ends in padding
    out = {"tokens": tokens, "segment_ids": segments}
    if cfg.architecture == "encoder_decoder":
        out["decoder_tokens"] = tokens[:, :8]
        out["decoder_segment_ids"] = segments[:, :8]
    return out


def _base_params(params):
    """Drop the hook leaves (adapters, prompt, prefixes): the base model's tree."""
    return unflatten_parts({p: v for p, v in flatten_parts(params).items()
                      if not (p[-1] in HOOK_LEAVES or any(k.endswith("_adapter") for k in p))})


def _setup(family, method, **kw):
    plan = peft.build(PeftConfig(method=method, **kw))
    base_cfg = model_config(family)
    cfg = plan.model_config(base_cfg)
    params = initial_params(cfg)
    trainable, frozen = jax.jit(plan.split)(params, jax.random.key(1))
    return plan, base_cfg, cfg, params, trainable, frozen


@pytest.mark.parametrize("family", ["gpt-tiny", "t5-tiny", "llama-tiny"])
@pytest.mark.parametrize("method", ["lora", "ia3", "adapters"])
def test_zero_init_methods_leave_outputs_unchanged(family, method):
    plan, base_cfg, cfg, params, trainable, frozen = _setup(family, method, adapter_dim=8)
    inputs = _inputs(cfg)
    reference = jitted_apply(base_cfg)(_base_params(params), inputs)["logits"]
    got = jitted_apply(cfg)(plan.merge(trainable, frozen), inputs)["logits"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference), rtol=1e-6, atol=1e-6)
    # ... and the PEFT leaves are not trivially absent: perturbing them changes the output
    bumped = jax.tree.map(lambda x: x + 0.05, trainable)
    moved = jitted_apply(cfg)(plan.merge(bumped, frozen), inputs)["logits"]
    assert float(jnp.max(jnp.abs(moved - reference))) > 1e-4


@pytest.mark.parametrize("family", ["gpt-tiny", "bert-tiny", "t5-tiny"])
def test_prompt_tuning_adds_positions_only(family):
    plan, base_cfg, cfg, params, trainable, frozen = _setup(family, "prompt_tuning",
                                                            num_virtual_tokens=4)
    assert set(flatten_parts(trainable)) == {("prompt",)}
    table = np.asarray(params["embed"]["token"]["embedding"])
    for row in np.asarray(trainable["prompt"]):  # vocab init: every row is a vocabulary row
        assert np.any(np.all(table == row, axis=1))
    inputs = _inputs(cfg)
    base = jitted_apply(base_cfg)(_base_params(params), inputs)
    got = jitted_apply(cfg)(plan.merge(trainable, frozen), inputs)
    for key in base:
        assert got[key].shape == base[key].shape, key
    assert float(jnp.max(jnp.abs(got["logits"] - base["logits"]))) > 1e-6  # the prompt acts


def test_prompt_tuning_matches_tokens_prepended_to_a_causal_decoder():
    """A soft prompt equal to embedding rows, at positions the model assigns (0), is the
    same as those tokens prepended... for a 1-token prompt in a decoder without learned
    positions (LLaMA: RoPE is relative, so the prompt at position 0 is a real first token)."""
    plan, base_cfg, cfg, params, trainable, frozen = _setup("llama-tiny", "prompt_tuning",
                                                            num_virtual_tokens=1)
    prompt_id = int(np.argmax(np.all(np.asarray(params["embed"]["token"]["embedding"])
                                     == np.asarray(trainable["prompt"][0]), axis=1)))
    tokens = jax.random.randint(jax.random.key(5), (2, 10), 5, cfg.vocab_size)
    got = jitted_apply(cfg)(plan.merge(trainable, frozen), {"tokens": tokens})["logits"]
    prepended = jnp.concatenate([jnp.full((2, 1), prompt_id), tokens], axis=1)
    positions = jnp.concatenate([jnp.zeros((2, 1), jnp.int32),
                                 jnp.broadcast_to(jnp.arange(10), (2, 10))], axis=1)
    want = jitted_apply(base_cfg)(_base_params(params), {"tokens": prepended,
                                                      "positions": positions})["logits"][:, 1:]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_lora_layout_axes_and_merge_unmerge():
    plan, base_cfg, cfg, params, trainable, frozen = _setup("gpt-tiny", "lora", rank=4,
                                                            alpha=8.0)
    q = trainable["decoder"]["layers"]["attention"]["query"]["kernel"]
    w = frozen["decoder"]["layers"]["attention"]["query"]["kernel"]  # [layers, embed, heads, kv]
    assert q["lora_a"].shape == w.shape[:2] + (4,)
    assert q["lora_b"].shape == (w.shape[0], 4) + w.shape[2:]
    assert not np.any(np.asarray(q["lora_b"]))  # B starts at zero
    out = trainable["decoder"]["layers"]["attention"]
    assert set(out) == {"query", "value"}  # default targets
    assert plan.axes(("decoder", "layers", "attention", "query", "kernel", "lora_a"),
                     q["lora_a"].shape) == ("layers", "embed", "lora")
    assert plan.axes(("decoder", "layers", "attention", "query", "kernel", "lora_b"),
                     q["lora_b"].shape) == ("layers", "lora", "heads", "kv")

    # Random B so the delta is not zero; reference: numpy activation-path LoRA, per kernel.
    trainable = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(7), x.shape),
                             trainable)
    merged = merge_lora(frozen, trainable, plan.cfg)
    a = np.asarray(trainable["decoder"]["layers"]["attention"]["query"]["kernel"]["lora_a"],
                   np.float64)
    b = np.asarray(trainable["decoder"]["layers"]["attention"]["query"]["kernel"]["lora_b"],
                   np.float64)
    w64 = np.asarray(w, np.float64)
    x = np.random.default_rng(0).normal(size=(5, w.shape[1]))
    mw = np.asarray(merged["decoder"]["layers"]["attention"]["query"]["kernel"], np.float64)
    for layer in range(w.shape[0]):
        ref = (np.einsum("te,ehk->thk", x, w64[layer])
               + (8.0 / 4) * np.einsum("tr,rhk->thk", x @ a[layer], b[layer]))
        np.testing.assert_allclose(np.einsum("te,ehk->thk", x, mw[layer]), ref, rtol=1e-5,
                                   atol=1e-5)
    # merged weights and the unmerged (in-step) transform give the same logits
    inputs = _inputs(cfg)
    unmerged_logits = jitted_apply(cfg)(plan.merge(trainable, frozen), inputs)["logits"]
    merged_logits = jitted_apply(cfg)(merged, inputs)["logits"]
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(unmerged_logits),
                               rtol=1e-5, atol=1e-5)
    restored = unmerge_lora(merged, trainable, plan.cfg)
    for p, v in flatten_parts(frozen).items():
        np.testing.assert_allclose(np.asarray(flatten_parts(restored)[p]), np.asarray(v),
                                   atol=1e-6, err_msg=str(p))


def test_rslora_scale():
    from llmjax.peft.lora import lora_scale
    assert lora_scale(PeftConfig(alpha=16, rank=4), 4) == 4.0
    assert lora_scale(PeftConfig(alpha=16, rank=4, rslora=True), 4) == 8.0


def test_ia3_equals_scaling_keys_values_and_mlp_activations():
    plan, base_cfg, cfg, params, trainable, frozen = _setup("gpt-tiny", "ia3")
    rng = np.random.default_rng(1)
    trainable = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype),
                             trainable)
    merged = plan.merge(trainable, frozen)
    layer = 1
    att, mlp = params["decoder"]["layers"]["attention"], params["decoder"]["layers"]["mlp"]
    m_att, m_mlp = merged["decoder"]["layers"]["attention"], merged["decoder"]["layers"]["mlp"]
    x = rng.normal(size=(3, cfg.d_model))
    for name in ("key", "value"):
        w, b = (np.asarray(att[name][k][layer], np.float64) for k in ("kernel", "bias"))
        scale = np.asarray(trainable["decoder"]["layers"]["attention"][name]["ia3"]["scale"]
                           [layer], np.float64)
        want = scale * (np.einsum("te,ehk->thk", x, w) + b)  # scaled activations
        got = (np.einsum("te,ehk->thk", x, np.asarray(m_att[name]["kernel"][layer]))
               + np.asarray(m_att[name]["bias"][layer]))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    h = rng.normal(size=(3, cfg.d_ff))
    scale = np.asarray(trainable["decoder"]["layers"]["mlp"]["wo"]["ia3"]["scale"][layer])
    want = (h * scale) @ np.asarray(mlp["wo"]["kernel"][layer]) + np.asarray(mlp["wo"]["bias"][layer])
    got = h @ np.asarray(m_mlp["wo"]["kernel"][layer]) + np.asarray(m_mlp["wo"]["bias"][layer])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert plan.axes(("decoder", "layers", "mlp", "wo", "ia3", "scale"), (2, 256)) == \
        ("layers", "mlp")


@pytest.mark.parametrize("method,expect", [
    ("ffn_only", lambda p: "/mlp/" in p),
    ("bitfit", lambda p: p.endswith("bias")),
    ("adapters", lambda p: "_adapter/" in p or "norm/" in p),
    ("prefix_tuning", lambda p: "prefix_" in p),
    ("freeze", lambda p: not ("embed/" in p or "attention/" in p)),
    ("full", lambda p: True),
])
def test_trainable_masks(method, expect):
    kw = {"targets": "embed/|attention/"} if method == "freeze" else {}
    plan, _, cfg, params, trainable, frozen = _setup("gpt-tiny", method, **kw)
    for path in flatten_parts(params):
        text = "/".join(path)
        assert (path in flatten_parts(trainable)) == expect(text), text
        assert (path in flatten_parts(trainable)) != (path in flatten_parts(frozen)), text


def test_composition_and_extra_trainable():
    plan, _, cfg, params, trainable, frozen = _setup("bert-tiny", "lora+head",
                                                     trainable="embed/norm/")
    paths = {"/".join(p) for p in flatten_parts(trainable)}
    assert any(p.endswith("lora_a") for p in paths)
    assert "heads/nsp/kernel" in paths and "embed/norm/scale" in paths
    assert "embed/token/embedding" not in paths


@pytest.mark.parametrize("section,message", [
    ({"method": "lorra"}, "did you mean 'lora'"),
    ({"method": "lora", "lora_dropout": 0.1}, "weight-space"),
    ({"method": "freeze"}, "needs peft.targets"),
    ({"method": "lora", "targets": "nothing_here"}, "matches no kernel"),
    ({"method": "lora", "trainable": "attention/query"}, "both trained and adapted"),
])
def test_config_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        plan = peft.build(PeftConfig(**section))
        cfg = plan.model_config(model_config("gpt-tiny"))
        jax.eval_shape(plan.split, initial_params(cfg), jax.random.key(1))


def test_bitfit_refuses_models_without_biases():
    with pytest.raises(ConfigError, match="no biases"):
        peft.build(PeftConfig(method="bitfit")).model_config(model_config("llama-tiny"))


def test_summary_counts():
    plan, _, cfg, params, trainable, frozen = _setup("gpt-tiny", "lora", rank=8)
    # gpt-tiny: 2 layers, d_model 64, 4 heads x 16; query and value: A 64x8, B 8x64
    lora = 2 * 2 * (64 * 8 + 8 * 64)
    text = peft.summary(trainable, frozen, method="lora")
    assert f"{lora:,} trainable" in text and "lora" in text
    total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) + lora
    assert f"of {total:,} parameters" in text


def _dir_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def test_adapter_checkpoint_round_trip_and_peft_merge(tmp_path):
    from llmjax.checkpoint import load_params, save_params
    from llmjax.peft.cli import add_subcommands
    import argparse

    base_cfg = model_config("gpt-tiny", vocab_size=4096, d_model=128, d_ff=512)
    pc = PeftConfig(method="lora", rank=4)
    plan = peft.build(pc)
    cfg = plan.model_config(base_cfg)
    params = init_params(cfg, jax.random.key(0))
    save_params(tmp_path / "base", params, base_cfg)
    trainable, frozen = plan.split(params, jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # "trained"
    peft.save_adapter(tmp_path / "adapter", trainable, pc, cfg, base=str(tmp_path / "base"))
    loaded, loaded_cfg, _ = peft.load_adapter(tmp_path / "adapter")
    assert loaded_cfg == pc
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded, trainable)
    ratio = _dir_bytes(tmp_path / "adapter") / _dir_bytes(tmp_path / "base")
    assert ratio < 0.1, ratio

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["peft", "merge", str(tmp_path / "adapter"), str(tmp_path / "out")])
    assert args.handler(args) == 0
    merged, config = load_params(tmp_path / "out")
    assert config["model"]["d_model"] == 128
    want = merge_lora(params, trainable, pc)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         atol=1e-6), merged, want)


def test_optimizer_state_lora_much_smaller_than_full():
    from llmjax.peft.report import nbytes
    from llmjax.train.experiment import build

    sizes = {}
    for method in ("full", "lora"):
        config = from_dict({"model": "gpt-tiny", "mesh": {"data": 1}, "peft": {"method": method}})
        state = build(config, devices=jax.devices()[:1]).abstract_state()
        sizes[method] = nbytes(state.opt_state)
        assert not jax.tree.leaves(state.frozen) if method == "full" else True
    assert sizes["lora"] < 0.05 * sizes["full"], sizes


def test_summary_cli_on_experiment_config(capsys):
    import argparse
    from llmjax.peft.cli import add_subcommands
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["peft", "summary", str(root / "configs/experiments/peft-lora.yaml"),
                              "peft.rank=4"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "optimizer state" in out and "measured" in out
