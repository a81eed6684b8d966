"""Checkpoints: exact resume after kill -9 / SIGTERM, kill -9 during an async save, resharding
on restore, clear errors on bad checkpoints (tiny GPT, seq 32, batch 8, mesh (2,2,2)).

Subprocess runs share the session's persistent compilation cache, so each pays the
interpreter start and imports (~4 s) but not the compiles.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import config
from llmjax.checkpoint import EXIT_PREEMPTED, CheckpointError, TrainCheckpoints
from llmjax.train.experiment import build
from llmjax.train.resume import restore_state
from llmjax.train.trainer import evaluate_run, train
from llmjax.tree import flatten

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 4


def overrides(run_dir, *extra):
    return [f"train.steps={STEPS}", "train.seq_len=32", "train.batch_size=8", "train.log_every=1",
            f"train.run_dir={run_dir}", "train.progress=false", "train.tensorboard=false",
            "train.eval_steps=1", "train.compilation_cache=", "mesh.data=2", "mesh.fsdp=2",
            "mesh.tensor=2", f"checkpoint.every={EVERY}", "data.synthetic_num_documents=200",
            *extra]


def make_config(run_dir, *extra):
    return config.load(REPO / "configs/experiments/gpt-tiny.yaml", overrides(run_dir, *extra))


CHILD = textwrap.dedent('''
    import json, os, re, signal, sys, time
    from pathlib import Path
    # 8 devices, the session's other XLA flags kept (they are part of the compile cache key)
    flags = re.sub("--xla_force_host_platform_device_count=[0-9]+", "",
                   os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=8"
    spec = json.loads(sys.argv[1])
    from llmjax import compile_cache, config
    compile_cache.enable(spec["cache"])
    import llmjax.checkpoint.data_state as ck
    from llmjax.train.trainer import train
    cfg = config.load(spec["config"], spec["overrides"])
    ckdir = Path(cfg.train.run_dir) / "checkpoints"
    if spec.get("slow_data_write_at"):
        original = ck._write_json
        def slow(path, data):  # the background write of this step's data item never ends
            if f"{spec['slow_data_write_at']}.orbax-checkpoint-tmp" in str(path):
                print("SLOW-SAVE", path, flush=True)
                time.sleep(600)
            original(path, data)
        ck._write_json = slow
    def on_step(step):
        if spec.get("sleep"):
            time.sleep(spec["sleep"])
        if step == spec.get("kill_at"):
            wait_for = spec.get("wait_for_checkpoint")
            while wait_for and not (ckdir / str(wait_for)).exists():
                time.sleep(0.01)
            print("KILL", step, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    result = train(cfg, on_step=on_step)
    print("EXIT", result.exit_code, result.checkpoint_step, flush=True)
    sys.exit(result.exit_code)
''')


def spawn(child_script, cache_dir, run_dir, **spec):
    spec = {"cache": str(cache_dir), "config": str(REPO / "configs/experiments/gpt-tiny.yaml"),
            "overrides": overrides(run_dir, *spec.pop("extra", ())), **spec}
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(child_script), json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            out[row["step"]] = row["loss"]
    return out


def flat_params(state) -> dict:
    return {k: np.asarray(jax.device_get(v))
            for k, v in flatten((state.params, state.opt_state)).items()}


def assert_same_params(a, b):
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    """2N steps without interruption (checkpoints at N and 2N)."""
    run_dir = tmp_path_factory.mktemp("straight")
    result = train(make_config(run_dir))
    assert result.exit_code == 0 and result.checkpoint_step == STEPS
    assert sorted(TrainCheckpoints(run_dir, make_config(run_dir)).all_steps()) == [EVERY, STEPS]
    return result, losses(run_dir)


def test_resume_after_kill9_is_bit_identical(tmp_path, straight, cache_dir, child_script):
    result, straight_losses = straight
    proc = spawn(child_script, cache_dir, tmp_path, kill_at=EVERY + 2, wait_for_checkpoint=EVERY)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out
    assert max(losses(tmp_path)) == EVERY + 2  # it ran past the checkpoint, then died
    resumed = train(make_config(tmp_path))
    assert resumed.resumed_from == EVERY and resumed.exit_code == 0
    assert losses(tmp_path) == straight_losses  # bit for bit, every step 1..2N
    assert_same_params(resumed.state, result.state)


def test_sigterm_checkpoints_at_step_boundary_and_resumes_exactly(tmp_path, straight, cache_dir,
                                                                 child_script):
    result, straight_losses = straight
    proc = spawn(child_script, cache_dir, tmp_path, sleep=0.3, extra=["checkpoint.every=0"])
    deadline = time.time() + 90
    while time.time() < deadline:  # SIGTERM at some point of step 3 or later (mid-step)
        path = tmp_path / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, out
    stopped = TrainCheckpoints(tmp_path, make_config(tmp_path)).all_steps()
    assert len(stopped) == 1 and 3 <= stopped[0] < STEPS, (stopped, out)
    resumed = train(make_config(tmp_path))
    assert resumed.resumed_from == stopped[0]
    assert losses(tmp_path) == straight_losses
    assert_same_params(resumed.state, result.state)


def test_kill9_during_async_save_keeps_previous_checkpoint(tmp_path, straight, cache_dir,
                                                          child_script):
    _, straight_losses = straight
    # every=2: checkpoint 2 commits; checkpoint 4's background write hangs; killed at step 6.
    proc = spawn(child_script, cache_dir, tmp_path, slow_data_write_at=4, kill_at=6,
                 extra=["checkpoint.every=2"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out
    assert "SLOW-SAVE" in out and "KILL 6" in out
    directory = tmp_path / "checkpoints"
    assert [p.name for p in directory.glob("4.orbax-checkpoint-tmp*")], list(directory.iterdir())
    assert not (directory / "4").exists()  # never committed
    steps = TrainCheckpoints(tmp_path, make_config(tmp_path, "checkpoint.every=2")).all_steps()
    assert steps == [2]
    resumed = train(make_config(tmp_path, "checkpoint.every=2"))
    assert resumed.resumed_from == 2
    assert losses(tmp_path) == straight_losses
    assert not list(directory.glob("*.orbax-checkpoint-tmp*"))  # cleaned up on restart


def test_reshard_222_to_811_to_one_device(tmp_path, straight, cache_dir):
    result, straight_losses = straight
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS))
    # Restored arrays are bit-identical whatever the mesh.
    reference = None
    for mesh, devices in (((2, 2, 2), None), ((8, 1, 1), None), ((1, 1, 1), jax.devices()[:1])):
        cfg = make_config(run_dir, f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}",
                          f"mesh.tensor={mesh[2]}")
        exp = build(cfg, devices)
        ckpt = TrainCheckpoints(run_dir, cfg)
        state, data, _ = restore_state(ckpt, EVERY, exp)
        ckpt.close()
        leaf = jax.tree.leaves(state.params)[0]
        assert len(leaf.sharding.device_set) == (1 if devices else 8)
        if reference is None:
            reference = state
        else:
            assert_same_params(state, reference)
    # Continue (2,2,2)@4 -> (8,1,1) to step 6 -> one device to step 8.
    cfg811 = make_config(run_dir, "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1",
                         "checkpoint.every=2")
    r1 = _train_until(cfg811, 6)
    assert r1.resumed_from == EVERY
    r2 = train(make_config(run_dir, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"),
               devices=jax.devices()[:1])
    assert r2.resumed_from == 6 and r2.step == STEPS
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(EVERY + 1, STEPS + 1):  # other meshes reduce in another order
        np.testing.assert_allclose(got[step], straight_losses[step], rtol=2e-5, err_msg=str(step))


def _train_until(cfg, stop_step):
    """Train with SIGTERM delivered at `stop_step` (checkpoint there, exit 75)."""
    def on_step(step):
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
    result = train(cfg, on_step=on_step)
    assert result.exit_code == EXIT_PREEMPTED and result.checkpoint_step == stop_step
    return result


@pytest.fixture()
def copy_of(straight, tmp_path):
    def make():
        run_dir = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(straight[0].run_dir, run_dir)
        return run_dir
    return make


def _damage(step_dir: Path, how: str) -> str:
    """Damage checkpoint `step_dir` as a cut-off save or a lost object would; returns a regex
    of what the message must name."""
    state = step_dir / "state"
    if how == "array chunk truncated":
        biggest = max(state.rglob("d/*"), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
        return rf"cannot read leaf \S+ .*{step_dir.name}/state"
    if how == "array chunk missing":
        max(state.rglob("d/*"), key=lambda p: p.stat().st_size).unlink()
        return rf"cannot read leaf \S+ .*{step_dir.name}/state"
    path, text = {"state metadata missing": ("state/_METADATA", None),
                  "data file missing": ("data/process_0.json", None),
                  "commit marker missing": ("commit_success.txt", None),
                  "meta truncated": ("meta/metadata", "cut")}[how]
    if text is None:
        (step_dir / path).unlink()
        return rf"{step_dir.name}/{path} is missing"
    (step_dir / path).write_text((step_dir / path).read_text()[:100])
    return rf"{step_dir.name}/{path} is truncated"


@pytest.fixture(scope="module")
def exp_of_run(straight):
    """The run's Experiment (model, mesh, shardings), built once for the restore-only tests."""
    return build(make_config(straight[0].run_dir, "train.steps=12"))


def _resume_point(run_dir, caplog, exp):
    """What a resume of `run_dir` starts from (no train step compiled): (step, warnings)."""
    from llmjax.train.resume import restore_or_init
    cfg = make_config(run_dir, "train.steps=12")
    ckpt = TrainCheckpoints(run_dir, cfg)
    caplog.clear()
    try:
        _, _, resumed, _ = restore_or_init(cfg, exp, ckpt, exp.state_shardings())
    finally:
        ckpt.close()
    return resumed, [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("how", ["state metadata missing", "data file missing",
                                 "commit marker missing", "meta truncated",
                                 "array chunk truncated", "array chunk missing"])
def test_torn_latest_checkpoint_resumes_from_the_newest_complete_one(copy_of, caplog, how,
                                                                   exp_of_run):
    """Issue 15: a torn latest checkpoint is skipped with a warning naming it and why (and
    moved aside, not deleted); with no complete one left, a CheckpointError names each."""
    run_dir = copy_of()
    named = _damage(run_dir / "checkpoints" / str(STEPS), how)
    resumed, warnings = _resume_point(run_dir, caplog, exp_of_run)
    assert resumed == EVERY
    assert len(warnings) == 1 and re.search(rf"skipped checkpoint {STEPS}: .*{named}",
                                            warnings[0]), warnings
    assert not (run_dir / "checkpoints" / str(STEPS)).exists()
    moved = list((run_dir / "checkpoints.incomplete").iterdir())
    assert [p.name.split("-")[0] for p in moved] == [str(STEPS)]
    if how == "array chunk truncated":  # the leaf named is the one whose read failed
        found = re.search(r"cannot read leaf (\S+) .*Error reading \"([^\"/]+)/", warnings[0])
        assert found and found.group(1).replace("/", ".") == found.group(2), warnings[0]
    if how in ("state metadata missing", "meta truncated"):  # none complete: an error
        also = _damage(run_dir / "checkpoints" / str(EVERY), how)
        with pytest.raises(CheckpointError, match=rf"holds no complete checkpoint \("
                                                  rf"checkpoint {EVERY}: .*{also}"):
            _resume_point(run_dir, caplog, exp_of_run)


def test_torn_latest_checkpoint_run_continues_exactly(copy_of, straight):
    """The whole loop: checkpoint 8 cut off before its commit -> train resumes from 4, saves 8
    again, and the losses of steps 5-8 equal the straight run's."""
    run_dir = copy_of()
    _damage(run_dir / "checkpoints" / str(STEPS), "commit marker missing")
    (run_dir / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= EVERY))
    result = train(make_config(run_dir))
    assert result.resumed_from == EVERY and result.checkpoint_step == STEPS
    assert losses(run_dir) == straight[1]


def test_failed_background_save_stops_the_loop(tmp_path, monkeypatch):
    """Issue 15: a save that fails in orbax's background thread (here: the data item's write
    raises) stops the loop at the next step, not at the next save or never, with one line
    naming the checkpoint and the cause; the earlier checkpoint stays."""
    import llmjax.checkpoint.data_state as data_state
    original = data_state._write_json

    def broken(path, data):
        if f"/{EVERY}.orbax-checkpoint-tmp" in str(path):
            raise RuntimeError("simulated: the store refused the object")
        original(path, data)

    monkeypatch.setattr(data_state, "_write_json", broken)
    reached = []

    def on_step(step):
        reached.append(step)
        if step == EVERY + 1:
            time.sleep(1.0)  # the background save has failed by now

    with pytest.raises(CheckpointError) as info:
        train(make_config(tmp_path, "checkpoint.every=2"), on_step=on_step)
    message = str(info.value)
    assert "\n" not in message and f"checkpoint {EVERY} in " in message
    assert "simulated: the store refused the object" in message
    assert "earlier checkpoints [2] are intact" in message
    assert max(reached) == EVERY + 1, reached  # stopped right there, before the next save
    assert TrainCheckpoints(tmp_path, make_config(tmp_path)).all_steps() == [2]


def test_diagnosis_blames_no_leaf_of_a_healthy_checkpoint(straight):
    """_diagnose (run after a failed restore) re-reads leaf by leaf; on a healthy checkpoint
    it must find nothing to blame (it once failed on every optimizer-state leaf)."""
    from llmjax.checkpoint.train_checkpoints import abstract_saved_form as _abstract_saved_form
    from llmjax.checkpoint.trees import diagnose as _diagnose
    cfg = make_config(straight[0].run_dir)
    exp = build(cfg)
    abstract = exp.abstract_state()
    target = _abstract_saved_form(abstract, exp.state_shardings(abstract))
    state_dir = straight[0].run_dir / "checkpoints" / str(STEPS) / "state"
    assert _diagnose(state_dir, target, RuntimeError("boom")) == \
        f"cannot read {state_dir}: RuntimeError: boom"


def test_other_family_and_vocab_are_clear_errors(copy_of):
    run_dir = copy_of()
    with pytest.raises(CheckpointError, match=r"vocab_size=512.*model.vocab_size=1024"):
        train(make_config(run_dir, "train.steps=12", "model.vocab_size=1024"))
    bert = config.load(REPO / "configs/experiments/bert-tiny.yaml",
                       [f"train.run_dir={run_dir}", "train.seq_len=32", "mesh.data=-1"])
    with pytest.raises(CheckpointError, match=r"family='gpt'.*model.family='bert'"):
        train(bert)
    with pytest.raises(CheckpointError, match=r"family='gpt'.*model.family='bert'"):
        train(config.load(REPO / "configs/experiments/bert-tiny.yaml",
                          [f"train.run_dir={run_dir.parent / 'ft'}", "train.seq_len=32",
                           f"train.init_from={run_dir}"]))
    # A shape mismatch on a leaf (same family and vocab) names the leaf.
    with pytest.raises(CheckpointError, match=r"leaf params/decoder/layers/mlp/wi/kernel"):
        train(make_config(run_dir, "train.steps=12", "model.d_ff=128"))


def test_resume_false_with_checkpoints_refuses(copy_of):
    with pytest.raises(config.ConfigError, match="checkpoint.resume=false"):
        train(make_config(copy_of(), "checkpoint.resume=false"))


def test_evaluate_run_restores_latest(straight):
    result, _ = straight
    metrics = evaluate_run(make_config(result.run_dir))
    assert metrics["step"] == STEPS
    assert metrics["loss"] == pytest.approx(result.eval_metrics["loss"], rel=1e-6)


@pytest.mark.parametrize("text, match", [("- model\n- train\n", "got list"),
                                         ("just words\n", "got str"),
                                         ("model: [unclosed\n", "not valid YAML")])
def test_config_yaml_that_is_not_a_mapping_is_one_line_naming_the_file(tmp_path, text, match):
    from llmjax.checkpoint import read_config
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=match) as info:
        read_config(tmp_path)
    assert str(tmp_path / "config.yaml") in str(info.value) and "\n" not in str(info.value)


def test_python_save_refuses_runs_and_other_files_and_force_replaces_an_export(tmp_path):
    """PretrainedModel.save / save_params guard their output as `llmjax convert` does."""
    from llmjax.checkpoint import load_params, save_params
    from llmjax.config import ConfigError, model_config
    from llmjax.models import init_params
    from llmjax.pretrained import PretrainedModel

    cfg = model_config("gpt-tiny", vocab_size=64, d_model=16, num_layers=1, num_heads=2,
                       d_ff=32, max_len=16)
    params = init_params(cfg, jax.random.key(0))
    model = PretrainedModel(cfg, params)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {steps: 5}\n")
    for force in (False, True):
        with pytest.raises(ConfigError, match="training run directory.*not even with force=True"):
            model.save(run, force=force)
        with pytest.raises(ConfigError, match="training run directory"):
            save_params(run, params, cfg, force=force)
    assert (run / "config.yaml").read_text() == "train: {steps: 5}\n"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="non-empty directory of other files; save into a new"):
        model.save(other, force=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    export = model.save(tmp_path / "export")
    (export / "tokenizer").mkdir()  # an earlier export's tokenizer: must not survive a replace
    (export / "tokenizer" / "llmjax_tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds an llmjax export.*pass force=True"):
        model.save(export)
    doubled = jax.tree.map(lambda x: x * 2, params)
    assert PretrainedModel(cfg, doubled).save(export, force=True) == export
    assert not (export / "tokenizer").exists()
    loaded, _ = load_params(export)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(doubled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
