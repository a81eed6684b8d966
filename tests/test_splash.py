"""model.attention_impl=splash: the Pallas splash kernel (run here in interpret mode) gives
XLA attention's outputs and gradients for every family it supports, sharded training with
it equals the single-device XLA run, and what it cannot express is a clear ConfigError
(as are cuDNN attention's dtype and backend limits; planning a cuDNN config works anywhere)."""
import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, from_dict, model_config
from llmjax.generate import generate
from llmjax.models import Transformer, ops
from llmjax.models.ops import splash
from llmjax.train.experiment import build
from helpers import MeshRuns, host
from helpers import close_trees as _close_trees


def _real_outputs_and_grads(preset: str, length: int, **overrides):
    """Outputs and parameter gradients of a loss over the non-padding positions.

    Padding queries differ by design (XLA: uniform over all keys; splash: the padding
    segment), and never reach a real position, so the comparison leaves them out."""
    cfg = model_config(preset, kernels="xla", max_len=max(128, length), **overrides)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(5, cfg.vocab_size, (2, length)), jnp.int32)
    first, real = length * 5 // 8, length * 13 // 16
    segments = jnp.asarray([[1] * first + [2] * (length - first),  # two packed documents
                            [1] * real + [0] * (length - real)], jnp.int32)  # right padding
    inputs = {"tokens": tokens, "segment_ids": segments}
    params = nn.unbox(model.init({"params": jax.random.key(0)}, **inputs)["params"])
    keep = (segments != 0)[..., None]
    probe = jnp.asarray(rng.standard_normal((2, length, cfg.d_model)), jnp.float32) * keep

    def loss(p):
        out = model.apply({"params": p}, **inputs)
        return jnp.sum(jnp.sin(out["logits"]) * keep) + jnp.sum(out["hidden"] * probe), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return {k: out[k] * keep for k in ("hidden", "logits")}, grads


@pytest.mark.parametrize("preset,length", [
    ("gpt-tiny", 16),  # MHA, causal, shorter than one 128-block (padded inside)
    ("bert-tiny", 16),  # bidirectional
    ("palm-tiny", 16),  # MQA: one key/value head
    ("llama-tiny", 300),  # GQA, three 128-blocks: the causal mask skips blocks
])
def test_splash_matches_xla_attention(preset, length):
    out_x, g_x = _real_outputs_and_grads(preset, length)
    out_s, g_s = _real_outputs_and_grads(preset, length, attention_impl="splash")
    for key in out_x:
        np.testing.assert_allclose(np.asarray(out_s[key]), np.asarray(out_x[key]),
                                   atol=1e-5, rtol=1e-5, err_msg=key)
    _close_trees(g_x, g_s, 1e-5)


@pytest.mark.parametrize("preset,mesh,model", [
    # heads and key/value heads split over tensor=2, batch over data x fsdp
    ("gpt-tiny", (2, 2, 2), {}),
    # 2 key/value heads cannot follow 8 query heads over tensor=4: repeated per query head
    ("llama-tiny", (2, 1, 4), {"num_kv_heads": 2}),
    # MQA: the one key/value head is replicated, query heads split over tensor=2
    ("palm-tiny", (1, 4, 2), {}),
], ids=["gpt-2x2x2", "llama-gqa-2x1x4", "palm-mqa-1x4x2"])
def test_sharded_splash_step_matches_single_device_xla(preset, mesh, model):
    """One SGD(lr 1) step from the same state: splash under shard_map on a mesh vs XLA
    attention on one device; the parameter change is the gradient, leaf by leaf."""
    runs = MeshRuns(preset, "clm", model)
    _, ref_state, ref = runs.run((1, 1, 1))
    _, state, got = runs.run(mesh, attention_impl="splash")
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    ref_grads = jax.tree.map(np.subtract, runs.params0, host(ref_state.params))
    grads = jax.tree.map(np.subtract, runs.params0, host(state.params))
    _close_trees(ref_grads, grads, 1e-5)
    assert float(ref["grad_norm"]) > 0.1


def test_generation_with_a_splash_model_decodes_with_xla():
    """Decoding steps attend one query to the KV cache: the splash model falls back to XLA."""
    cfg = model_config("gpt-tiny", kernels="xla")
    params = nn.unbox(Transformer(cfg).init(jax.random.key(1), jnp.ones((1, 8), jnp.int32))
                      ["params"])
    prompts = [[5, 9, 7], [11, 4]]
    want = generate(cfg, params, prompts, max_new_tokens=6)
    got = generate(model_config("gpt-tiny", kernels="xla", attention_impl="splash"), params,
                   prompts, max_new_tokens=6)
    assert got == want


def test_what_splash_cannot_express_is_a_config_error():
    with pytest.raises(ConfigError, match="splash cannot run this model: .*relative position"):
        model_config("t5-tiny", attention_impl="splash")
    with pytest.raises(ConfigError, match="prefix_lm.*splash.*attention_impl=auto"):
        build(from_dict({"model": {"preset": "gpt-tiny", "attention_impl": "splash"},
                         "objective": {"name": "prefix_lm"}}), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match="soft prompt"):
        model_config("gpt-tiny", attention_impl="splash", prompt_tokens=4)
    # PEFT hooks set on a validated config are caught when the model is traced.
    cfg = dataclasses.replace(model_config("gpt-tiny", attention_impl="splash"), prefix_tokens=4)
    with pytest.raises(ConfigError, match="prefix tuning"):
        jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))


def test_auto_picks_splash_on_tpu_only_where_it_fits(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert ops.resolve_attention(model_config("llama-tiny", attention_impl="auto")) == "splash"
    assert ops.resolve_attention(model_config("t5-tiny", attention_impl="auto")) == "xla"
    assert ops.resolve_attention(
        model_config("gpt-tiny", attention_impl="auto", prefix_tokens=2)) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ops.resolve_attention(
        model_config("gpt-tiny", attention_impl="auto", dtype="bfloat16")) == "cudnn"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert ops.resolve_attention(model_config("gpt-tiny", attention_impl="auto")) == "xla"
    assert splash.unsupported(model_config("palm-tiny")) is None


def test_cudnn_asks_for_its_dtype_and_a_gpu(monkeypatch):
    with pytest.raises(ConfigError, match="bfloat16 or float16"):
        model_config("gpt-tiny", attention_impl="cudnn", dtype="float32")
    cfg = model_config("gpt-tiny", attention_impl="cudnn", dtype="bfloat16")  # valid anywhere
    with pytest.raises(ConfigError, match="needs a GPU .this backend: cpu"):
        jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ops.resolve_attention(cfg) == "cudnn"


def test_plan_of_a_gpu_config_runs_on_cpu(capsys):
    from llmjax.cli import main
    config = Path(__file__).parent.parent / "configs/experiments/llama-tiny.yaml"
    code = main(["plan", str(config), "model.attention_impl=cudnn",
                 "model.dtype=bfloat16"])
    assert code == 0
    assert "per device: params" in capsys.readouterr().out
