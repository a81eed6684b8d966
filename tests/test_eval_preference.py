"""`llmjax eval` of a preference run (dpo) reports the objective's own metrics: the dpo loss,
the reward accuracy (dpo_accuracy) and the mean rewards, never a perplexity (exp of a dpo
loss is none). At step 0 the policy is its reference: loss ln 2 and rewards 0 exactly."""
import json
import math

import jax
import numpy as np

from llmjax import parallel
from llmjax.config import from_dict
from llmjax.train.evaluate import data_iterator, evaluate
from llmjax.train.experiment import build

MODEL = {"preset": "gpt-tiny", "vocab_size": 192, "d_model": 32, "num_layers": 1, "num_heads": 2,
         "d_ff": 64, "max_len": 16}


def test_dpo_eval_reports_rewards_and_no_perplexity(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"prompt": rng.integers(110, 192, 4).tolist(), "chosen": [120] * 4,
             "rejected": rng.integers(130, 192, 4).tolist()} for _ in range(16)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict({
        "model": MODEL, "objective": {"name": "dpo", "beta": 0.5, "reference": "copy"},
        "data": {"source": "preference", "train_files": [str(pairs)],
                 "validation_files": [str(pairs)], "add_eos": False},
        "mesh": {"data": 1}, "train": {"batch_size": 8, "seq_len": 16, "steps": 1}})
    exp = build(cfg, devices=jax.devices()[:1])
    state = exp.init_state()
    it = data_iterator(exp, "validation")
    keys = list(it.output_shapes())
    it.close()
    metrics = evaluate(exp, state, exp.eval_step(keys), parallel.batch_sharding(exp.mesh), 2)
    assert set(metrics) == {"dpo_loss", "dpo_accuracy", "reward_chosen", "reward_rejected",
                            "reward_margin", "loss"}
    assert math.isclose(metrics["dpo_loss"], math.log(2), rel_tol=1e-6)
    assert metrics["loss"] == metrics["dpo_loss"]
    assert metrics["reward_chosen"] == metrics["reward_margin"] == 0.0
