"""Preference objectives: dpo (with orpo and simpo sharing its code) and the preference data
kind (issue 19, "Must show").

- step 0 with policy = reference: loss = ln 2 and rewards 0 exactly (reference = the LoRA
  base with the delta off, and = a frozen copy of the initial parameters);
- the loss of the train step and its gradient with respect to the logits equal a numpy
  implementation of the formulas on the tiny model's logits (dpo, orpo, simpo);
- the reference parameters are bit-unchanged after training;
- LoRA-as-reference holds no second copy of the base (compiled argument bytes);
- on pairs whose chosen answers follow a rule, reward accuracy >= 0.9 after a short run;
- bad rows (missing field, chosen == rejected) fail naming file and line.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import parallel
from llmjax.config import ConfigError, from_dict
from llmjax.data.device import to_global
from llmjax.data.pipeline import make_iterator
from llmjax.peft.reference import REFERENCE
from llmjax.train.experiment import build
from llmjax.train.step import forward
from llmjax.tree import flatten_parts

BATCH, SEQ = 8, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
MODEL = {"preset": "gpt-tiny", "vocab_size": 192, "d_model": 32, "num_layers": 1, "num_heads": 2,
         "d_ff": 64, "max_len": SEQ}


def rule_pairs(n: int, seed: int) -> list[dict]:
    """Chosen completions repeat the prompt's first token; rejected ones are random."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = rng.integers(110, 192, int(rng.integers(3, 7))).tolist()
        chosen = [prompt[0]] * 4
        rejected = rng.integers(110, 192, 4).tolist()
        if rejected == chosen:
            rejected[0] = 110 + (chosen[0] - 109) % 82
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rule_pairs(64, 0)))
    return str(path)


def config(pairs_file, objective="dpo", peft=None, **objective_kw):
    return from_dict({
        "model": MODEL,
        "objective": {"name": objective, "beta": 0.5, **objective_kw},
        "data": {"source": "preference", "train_files": [pairs_file], "add_eos": False},
        "mesh": {"data": 1},
        "train": {"batch_size": BATCH, "seq_len": SEQ, "steps": 40},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant",
                      "weight_decay": 0.0},
        "peft": peft or {"method": "full"},
    })


class Run:
    """An experiment with its initial state, compiled step and the data's first batches."""

    def __init__(self, cfg):
        self.exp = exp = build(cfg, devices=jax.devices()[:1])
        self.shardings = exp.state_shardings()
        self.batches = make_iterator(cfg.data, "preference", SEQ, BATCH)
        first = next(self.batches)
        key = jax.random.key(cfg.train.seed)
        init = jax.jit(exp._init_fn, out_shardings=self.shardings)
        self.state = init.lower(key).compile(FAST_COMPILE)(key)
        spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in first.items()}
        self.compiled = exp.train_step(first.keys(), self.shardings).lower(
            exp.abstract_state(), spec).compile(FAST_COMPILE)
        self.first = first

    def put(self, batch):
        return to_global(batch, parallel.batch_sharding(self.exp.mesh))


@pytest.fixture(scope="module")
def lora_run(pairs_file):
    return Run(config(pairs_file, peft={"method": "lora", "rank": 4, "alpha": 8,
                                        "targets": "attention/(query|value)/"}))


@pytest.fixture(scope="module")
def copy_run(pairs_file):
    return Run(config(pairs_file, reference="copy"))


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


# ------------------------------------------------------------------ step 0


@pytest.mark.parametrize("which", ["lora_run", "copy_run"])
def test_step0_loss_is_ln2_and_rewards_zero(which, request):
    run = request.getfixturevalue(which)
    _, metrics = run.compiled(host_copy(run.state), run.put(run.first))
    m = host(metrics)
    assert float(m["dpo_loss"]) == pytest.approx(math.log(2), abs=1e-7)
    assert f"{float(m['dpo_loss']):.6f}" == "0.693147"
    for name in ("reward_chosen", "reward_rejected", "reward_margin"):
        assert float(m[name]) == 0.0, (name, m[name])
    assert float(m["dpo_accuracy"]) == 0.0  # no pair is preferred yet (strictly)


def host_copy(state):
    """A fresh copy of a state (the compiled step donates its input)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


# ------------------------------------------------------------------ numpy reference


def np_logprobs(logits, targets, weights):
    logits = logits.astype(np.float64)
    z = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - z).sum(-1)) + z[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return ((picked - logz) * weights).sum(-1)


def np_loss(name, beta, smooth, gamma, pol, ref, targets, weights):
    """The per-pair losses (and margins) of the papers' formulas, in float64."""
    lp = np_logprobs(pol, targets, weights)
    n = len(lp) // 2
    lengths = weights.sum(-1)
    pc, pr = lp[:n], lp[n:]
    logsig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    if name == "dpo":
        lr_ = np_logprobs(ref, targets, weights)
        z = beta * (pc - lr_[:n]) - beta * (pr - lr_[n:])
        return -(1 - smooth) * logsig(z) - smooth * logsig(-z)
    mc, mr = pc / lengths[:n], pr / lengths[n:]
    if name == "simpo":
        z = beta * (mc - mr) - gamma
        return -(1 - smooth) * logsig(z) - smooth * logsig(-z)
    odds = lambda m: m - np.log(1 - np.exp(m))  # noqa: E731
    return -mc - beta * logsig(odds(mc) - odds(mr))


@pytest.fixture(scope="module")
def logits(lora_run):
    """(prepared batch, policy logits, reference logits) of the LoRA run with B != 0, so
    policy and reference differ."""
    exp = lora_run.exp
    batch = exp.objective.prepare(jax.tree.map(jnp.asarray, lora_run.first), jax.random.key(0))

    def both(trainable, frozen):
        trainable = jax.tree.map(lambda x: x + 0.05, trainable)
        return (forward(exp.model, exp.plan.merge(trainable, frozen), batch)["logits"],
                forward(exp.model, exp.plan.reference(trainable, frozen), batch)["logits"])
    args = (lora_run.state.params, lora_run.state.frozen)
    return batch, *jax.jit(both).lower(*args).compile(FAST_COMPILE)(*args)


@pytest.mark.parametrize("name,kw", [("dpo", {"dpo_label_smoothing": 0.1}),
                                     ("simpo", {"simpo_gamma": 0.3}), ("orpo", {})])
def test_loss_and_logit_gradients_match_numpy(name, kw, lora_run, logits, pairs_file):
    """objective.loss on the tiny model's real logits against the formulas in numpy (float64);
    its gradient with respect to the policy logits against numpy central differences."""
    from llmjax.objectives import build as build_objective
    exp = lora_run.exp
    cfg = config(pairs_file, objective=name, **kw).objective
    objective = build_objective(cfg, exp.model_config, exp.special)
    batch, policy, ref = logits
    targets, weights = np.asarray(batch["pref_targets"]), np.asarray(batch["pref_weights"])

    def mean_loss(logits):
        term = objective.loss({"logits": logits, "reference": {"logits": ref}}, batch)[name]
        return term.loss_sum / term.count

    value, grad = jax.jit(jax.value_and_grad(mean_loss))(policy)
    expected = np_loss(name, 0.5, kw.get("dpo_label_smoothing", 0.0), kw.get("simpo_gamma", 0.0),
                       np.asarray(policy), np.asarray(ref), targets, weights)
    assert float(value) == pytest.approx(expected.mean(), abs=1e-5)
    # Directional derivatives along random directions: numpy central differences.
    rng = np.random.default_rng(1)
    pol64 = np.asarray(policy, np.float64)
    for _ in range(3):
        d = rng.normal(size=pol64.shape)
        h = 1e-4
        plus = np_loss(name, 0.5, kw.get("dpo_label_smoothing", 0.0), kw.get("simpo_gamma", 0.0),
                       pol64 + h * d, np.asarray(ref), targets, weights).mean()
        minus = np_loss(name, 0.5, kw.get("dpo_label_smoothing", 0.0), kw.get("simpo_gamma", 0.0),
                        pol64 - h * d, np.asarray(ref), targets, weights).mean()
        assert float(np.sum(np.asarray(grad, np.float64) * d)) == pytest.approx(
            (plus - minus) / (2 * h), abs=1e-5)


# ------------------------------------------------------------------ training


def train(run, steps):
    state, history = host_copy(run.state), []
    for _ in range(steps):
        state, metrics = run.compiled(state, run.put(next(run.batches)))
        history.append(host(metrics))
    return state, history


@pytest.fixture(scope="module")
def copy_trained(copy_run):
    return train(copy_run, 40)


def test_reward_accuracy_after_a_short_run(copy_trained):
    _, history = copy_trained
    last = history[-5:]
    accuracy = np.mean([float(m["dpo_accuracy"]) for m in last])
    assert accuracy >= 0.9, [float(m["dpo_accuracy"]) for m in history]
    assert np.mean([float(m["dpo_loss"]) for m in last]) < 0.5
    assert np.mean([float(m["reward_margin"]) for m in last]) > 0


def test_reference_copy_bit_unchanged_and_policy_moved(copy_run, copy_trained):
    state, _ = copy_trained
    before = flatten_parts(host(copy_run.state.frozen[REFERENCE]))
    after = flatten_parts(host(state.frozen[REFERENCE]))
    assert before.keys() == after.keys()
    for path in before:
        assert np.array_equal(before[path].view(np.uint8), after[path].view(np.uint8)), path
    params = flatten_parts(host(state.params))
    assert any(not np.array_equal(params[p], before[p]) for p in before)


def test_lora_reference_base_bit_unchanged(lora_run):
    before = flatten_parts(host(lora_run.state.frozen))
    state, history = train(lora_run, 3)
    after = flatten_parts(host(state.frozen))
    for path in before:
        assert np.array_equal(before[path].view(np.uint8), after[path].view(np.uint8)), path
    assert float(history[-1]["dpo_loss"]) != pytest.approx(math.log(2), abs=1e-6)


def test_lora_reference_holds_no_second_copy(lora_run, copy_run):
    """The compiled step's arguments are the state and the batch; with LoRA the state holds the
    base once (frozen) and no reference copy, so the arguments stay within state + batch, and
    the copy-reference run's arguments exceed the same model's parameters twice."""
    def nbytes(tree):
        return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")
                   and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
    batch = sum(v.nbytes for v in lora_run.first.values())
    base = nbytes(lora_run.state.frozen)
    adapters = nbytes(lora_run.state.params)
    assert REFERENCE not in lora_run.state.frozen
    args = lora_run.compiled.memory_analysis().argument_size_in_bytes
    # state = base once + adapters + Adam moments of the adapters + step/rng scalars
    assert args <= base + 3 * adapters + batch + 1024, (args, base, adapters, batch)
    copy_args = copy_run.compiled.memory_analysis().argument_size_in_bytes
    params = nbytes(copy_run.state.params)
    assert copy_args >= 4 * params  # params, reference copy, two Adam moments


# ------------------------------------------------------------------ configuration and data


def test_adapter_reference_needs_a_transform_method(pairs_file):
    with pytest.raises(ConfigError, match="objective.reference=copy"):
        build(config(pairs_file), devices=jax.devices()[:1])  # full fine-tuning, reference=adapter


def write_rows(tmp_path, rows):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_rows_name_file_and_line(tmp_path):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = write_rows(tmp_path, [good, {"prompt": "a", "chosen": "b"}])
    cfg = config(path).data
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: no field 'rejected'"):
        make_iterator(cfg, "preference", SEQ, 2, process_index=0, process_count=1)
    path = write_rows(tmp_path, [good, good, {"prompt": "a", "chosen": "same", "rejected": "same"}])
    with pytest.raises(ConfigError, match=r"bad.jsonl line 3: 'chosen' equals 'rejected'"):
        make_iterator(config(path).data, "preference", SEQ, 2, process_index=0, process_count=1)


def test_preference_rows_masks_and_truncation(tmp_path):
    rows = [{"prompt": [10, 11, 12], "chosen": [20, 21], "rejected": [30]},
            {"prompt": list(range(10, 30)), "chosen": list(range(40, 50)), "rejected": [50]}]
    cfg = config(write_rows(tmp_path, rows)).data
    cfg.shuffle = False
    it = make_iterator(cfg, "preference", SEQ, 2, process_index=0, process_count=1, num_epochs=1)
    batch = next(it)
    assert batch["chosen"][0].tolist() == [10, 11, 12, 20, 21] + [0] * 11
    assert batch["chosen_mask"][0].tolist() == [1, 1, 1, 2, 2] + [0] * 11
    assert batch["rejected"][0].tolist() == [10, 11, 12, 30] + [0] * 12
    assert batch["rejected_mask"][0].tolist() == [1, 1, 1, 2] + [0] * 12
    # too long: the prompt keeps its tail (half the row), the completion its head
    assert batch["chosen"][1].tolist() == list(range(22, 30)) + list(range(40, 48))
    assert batch["rejected_mask"][1].tolist() == [1] * 8 + [2] + [0] * 7
    assert it.stats()["truncated_examples"] == 1


def test_chunked_scores_equal_whole_logits():
    """train.logits_chunk: the completion log-probs computed chunk by chunk (the head applied
    inside a rematerialised scan) equal those of the whole logits, padding chunk included."""
    from llmjax.objectives.base import ChunkedLogits
    from llmjax.objectives.preference import sequence_logprobs
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(4, 10, 8)), jnp.float32)
    head_w = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
    head = lambda h: h @ head_w  # noqa: E731
    targets = jnp.asarray(rng.integers(0, 32, (4, 10)))
    weights = jnp.asarray(rng.integers(0, 2, (4, 10)), jnp.float32)
    whole = sequence_logprobs(head(hidden), targets, weights)
    chunked = sequence_logprobs(ChunkedLogits(hidden, head, 4), targets, weights)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6)


def test_pairs_stay_together_in_micro_batches(lora_run):
    """With train.grad_accum=k the step splits the prepared batch into rows i, i+k, ...:
    each micro-batch holds its pairs' chosen rows, then the same pairs' rejected rows."""
    from llmjax.train.step import _micro_batches
    batch = lora_run.exp.objective.prepare(jax.tree.map(jnp.asarray, lora_run.first),
                                           jax.random.key(0))
    first = lora_run.first
    for k in (2, 4):
        micro = host(_micro_batches({"tokens": batch["tokens"], "pair_valid": batch["pair_valid"]}, k))
        for i in range(k):
            pairs = np.arange(i, BATCH, k)
            n = len(pairs)
            assert np.array_equal(micro["tokens"][i][:n], first["chosen"][pairs])
            assert np.array_equal(micro["tokens"][i][n:], first["rejected"][pairs])
            assert micro["pair_valid"][i].shape == (n,)


def test_source_and_objective_must_agree(pairs_file):
    cfg = config(pairs_file)
    with pytest.raises(ConfigError, match="data.source='preference' feeds objectives"):
        make_iterator(cfg.data, "lm", SEQ, 2, process_index=0, process_count=1)


# ------------------------------------------------------------------ cached reference (mode iii)


def cached_config(pairs_file, run_dir, steps: int):
    """reference=cached, validation on the same pairs; the trainer test's settings (the
    fixture compiles the trainer's programs, so the trainer finds them in the cache)."""
    c = config(pairs_file, reference="cached")
    c.data.validation_files = [pairs_file]
    c.train.steps, c.train.log_every, c.train.eval_steps = steps, 1, 1
    c.train.run_dir, c.train.progress, c.train.tensorboard = str(run_dir), False, False
    c.train.plot, c.checkpoint.every, c.checkpoint.async_save = False, 2, False
    return c


@pytest.fixture(scope="module")
def cached_trained(pairs_file, tmp_path_factory):
    """`llmjax train` with reference=cached, 2 steps (its programs land in the compilation
    cache, where cached_run finds them)."""
    from llmjax.train.trainer import train as run_train
    run_dir = tmp_path_factory.mktemp("cached-trained")
    result = run_train(cached_config(pairs_file, run_dir, 2), devices=jax.devices()[:1])
    assert result.step == 2
    return run_dir


@pytest.fixture(scope="module")
def cached_run(pairs_file, copy_run, cached_trained, tmp_path_factory):
    """reference=cached on the copy run's model and initial state (less its reference copy):
    the scores computed once into a run directory, attached to fresh batches."""
    from llmjax.peft.reference import without_reference
    from llmjax.train import reference_cache
    cfg = cached_config(pairs_file, tmp_path_factory.mktemp("cached-run"), steps=2)
    exp = build(cfg, devices=jax.devices()[:1])
    shardings = exp.state_shardings()
    state = host_copy(copy_run.state)
    state = state.replace(frozen=without_reference(state.frozen))
    assert jax.tree.structure(state) == jax.tree.structure(exp.abstract_state())
    reference_cache.prepare(exp, state, cfg.train.run_dir, resumed=False, progress=False)
    run = Run.__new__(Run)
    run.exp, run.shardings, run.state = exp, shardings, state
    run.batches = fresh_batches(exp)
    run.first = next(run.batches)
    run.compiled = exp.train_step(run.first.keys(), shardings).lower(
        state, run.put(run.first)).compile()  # as the trainer compiles it
    return run


def fresh_batches(exp):
    from llmjax.train.evaluate import data_iterator
    return data_iterator(exp, "train")


COMPARED = ("dpo_loss", "reward_chosen", "reward_rejected", "reward_margin", "loss")


@pytest.fixture(scope="module")
def copy_steps(copy_run):
    """(state before, metrics) of the copy reference's first 4 steps on a fresh iterator."""
    batches = make_iterator(copy_run.exp.config.data, "preference", SEQ, BATCH)
    state, history = host_copy(copy_run.state), []
    for _ in range(4):
        before = host_copy(state)
        state, metrics = copy_run.compiled(state, copy_run.put(next(batches)))
        history.append((before, host(metrics)))
    return history


def test_cached_reference_equals_copy_reference(cached_run, copy_steps):
    """Steps 0-3 of the copy reference's run, each also taken with the cached scores from the
    same policy state: the same losses and rewards within 1e-6 (the reference scores agree);
    step 0 is ln 2."""
    from llmjax.peft.reference import without_reference
    assert set(cached_run.first) == {"chosen", "chosen_mask", "rejected", "rejected_mask",
                                     "ref_chosen", "ref_rejected"}
    assert cached_run.first["ref_chosen"].dtype == np.float32
    batches = fresh_batches(cached_run.exp)
    for step, (before, expected) in enumerate(copy_steps):
        state = before.replace(frozen=without_reference(before.frozen))
        _, metrics = cached_run.compiled(state, cached_run.put(next(batches)))
        metrics = host(metrics)
        if step == 0:  # (not to the bit: the scores come from another compiled program)
            assert float(metrics["dpo_loss"]) == pytest.approx(math.log(2), abs=5e-7)
            assert f"{float(metrics['dpo_loss']):.6f}" == "0.693147"
            assert abs(float(metrics["reward_margin"])) < 1e-6
        for name in COMPARED:
            assert float(metrics[name]) == pytest.approx(float(expected[name]), abs=1e-6), (
                step, name)
    assert float(metrics["dpo_loss"]) < math.log(2) - 1e-3  # it trained


def test_cached_reference_through_the_trainer_resumes_exactly(pairs_file, cached_trained,
                                                              copy_steps, caplog):
    """llmjax train with reference=cached, stopped after 2 steps and resumed to 4: the
    resumed run reads the files (no recompute) and follows the copy reference's run. (Within
    1e-4, not 1e-6: the trainer compiles with other XLA options than copy_run, and Adam's
    first step, lr * sign(g), turns 1e-7 gradient noise into whole-lr differences.)"""
    from llmjax.metrics import read_metrics
    from llmjax.train import reference_cache
    from llmjax.train.trainer import train as run_train

    run_dir = cached_trained
    assert sorted(os.listdir(run_dir / reference_cache.CACHE_DIR)) == ["train.npz",
                                                                        "validation.npz"]
    with caplog.at_level("INFO"):
        result = run_train(cached_config(pairs_file, run_dir, 4), devices=jax.devices()[:1])
    assert result.resumed_from == 2 and result.step == 4
    assert "written to" not in caplog.text and "64 train pairs read from" in caplog.text
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") != "eval"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=5e-7)
    for row, (_, expected) in zip(rows, copy_steps):
        for name in COMPARED:
            assert row[name] == pytest.approx(float(expected[name]), abs=1e-4), (row["step"], name)
    assert math.isfinite(result.eval_metrics["dpo_loss"])


def test_cached_reference_holds_no_reference_params(cached_run, copy_run):
    """The compiled step's arguments: the state (params + two Adam moments, no reference
    copy) and the batch; the copy reference's are one parameter set larger."""
    def nbytes(tree):
        return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")
                   and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
    params = nbytes(cached_run.state.params)
    assert REFERENCE not in cached_run.state.frozen and not cached_run.exp.objective.needs_reference
    batch = sum(v.nbytes for v in cached_run.first.values())
    args = cached_run.compiled.memory_analysis().argument_size_in_bytes
    assert args <= 3 * params + batch + 1024, (args, params, batch)
    copy_args = copy_run.compiled.memory_analysis().argument_size_in_bytes
    assert copy_args - args >= params - 8 * BATCH - 1024


def test_cached_reference_file_reuse_and_stale_detection(cached_run, pairs_file, tmp_path,
                                                         monkeypatch, caplog):
    """The file is reused when data and initial parameters fit (also on resume); other
    initial parameters are detected and recomputed; a resumed run with other data is
    refused naming the file."""
    from llmjax.checkpoint import CheckpointError
    from llmjax.train import reference_cache
    exp, state = cached_run.exp, cached_run.state
    run_dir = exp.config.train.run_dir
    path = reference_cache.cache_path(run_dir, "train")
    saved = reference_cache.read(path)
    assert saved["chosen"].shape == (64,) and np.all(saved["chosen"] < 0)

    def no_compute(*args):
        raise AssertionError("recomputed a valid cache")
    with monkeypatch.context() as patch:  # fitting file: read, not computed (fresh and resumed)
        patch.setattr(reference_cache, "compute", no_compute)
        for resumed in (False, True):
            exp.reference_logprobs.clear()
            reference_cache.prepare(exp, state, run_dir, resumed=resumed, progress=False)
            np.testing.assert_array_equal(exp.reference_logprobs["train"]["ref_chosen"],
                                          saved["chosen"])
    # other initial parameters: a fresh run recomputes and replaces the file
    moved = state.replace(params=jax.tree.map(lambda x: x * 1.01, state.params))
    exp.reference_logprobs.clear()
    with caplog.at_level("WARNING"):
        reference_cache.prepare(exp, moved, run_dir, resumed=False, progress=False)
    assert f"{path} was computed for other initial parameters" in caplog.text
    again = reference_cache.read(path)
    assert again["params"] != saved["params"] and again["data"] == saved["data"]
    assert not np.allclose(again["chosen"], saved["chosen"])
    # other data (one pair fewer) on resume: refused, naming the file
    rows = open(pairs_file).read().splitlines()[1:]
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(rows) + "\n")
    cfg = config(str(other), reference="cached")
    cfg.train.run_dir, cfg.train.eval_steps = run_dir, 0
    other_exp = build(cfg, devices=jax.devices()[:1])
    with pytest.raises(CheckpointError, match=f"{path}: computed for other data"):
        reference_cache.prepare(other_exp, state, run_dir, resumed=True, progress=False)


def test_params_fingerprint_is_exact_and_mesh_independent():
    """The uint32 sums are the same for a leaf on one device and sharded over 8, and change
    with a single flipped bit."""
    from llmjax.train.reference_cache import _leaf_sums
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 24)), jnp.float32)
    one = np.asarray(jax.jit(_leaf_sums)(x))
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("d")))
    assert np.array_equal(np.asarray(jax.jit(_leaf_sums)(sharded)), one)
    flipped = np.asarray(x).copy().view(np.uint32)
    flipped[3, 5] ^= 1
    assert not np.array_equal(np.asarray(jax.jit(_leaf_sums)(jnp.asarray(flipped.view(np.float32)))), one)
    swapped = np.asarray(x).copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not np.array_equal(np.asarray(jax.jit(_leaf_sums)(jnp.asarray(swapped))), one)
