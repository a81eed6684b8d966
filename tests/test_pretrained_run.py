"""from_pretrained on a training run: the latest checkpoint's parameters with the run's PEFT
plan merged, matching what the trainer's own model computes."""
import jax
import numpy as np

import llmjax
from llmjax.config import from_dict
from llmjax.train.trainer import train


def test_from_pretrained_on_a_lora_run_gives_the_trained_models_logits(tmp_path):
    cfg = from_dict({
        "model": "gpt-tiny", "mesh": {"data": 1}, "data": {"source": "synthetic"},
        "peft": {"method": "lora", "rank": 4},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0},
        "train": {"steps": 3, "batch_size": 4, "seq_len": 16, "log_every": 1,
                  "eval_steps": 1, "run_dir": str(tmp_path / "run"), "progress": False,
                  "tensorboard": False, "compilation_cache": ""}})
    result = train(cfg, devices=jax.devices()[:1])
    tokens = np.array([[110, 200, 300, 400, 150]], np.int32)

    from llmjax import peft
    from llmjax.models import Transformer
    plan = peft.build(cfg.peft)
    params = plan.merge(result.state.params, result.state.frozen)
    expected = Transformer(plan.model_config(cfg.model)).apply({"params": params}, tokens)["logits"]
    assert np.abs(np.asarray(result.state.params["decoder"]["layers"]["attention"]["query"]
                             ["kernel"]["lora_b"])).max() > 0  # the adapter did train

    model = llmjax.from_pretrained(tmp_path / "run")
    np.testing.assert_allclose(model.logits(tokens), np.asarray(expected), atol=1e-5)
