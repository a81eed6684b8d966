"""Run lifecycle safety: preflight checks, NaN guard, signals (Ctrl-C, start-up SIGTERM),
metrics after kill -9, disk errors, finished runs, time-based checkpoints (tiny GPT, seq 32,
batch 8, 8 CPU devices). Subprocesses only where a process is the behaviour (exit codes,
signals, kill -9); they share the session's persistent compilation cache.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import config
from llmjax.checkpoint import EXIT_PREEMPTED, CheckpointError, TrainCheckpoints
from llmjax.config import ConfigError
from llmjax.train.guard import NonFiniteError
from llmjax.train.resume import restore_state
from llmjax.train.signals import EXIT_INTERRUPTED
from llmjax.train.trainer import train
from llmjax.tree import flatten

REPO = Path(__file__).resolve().parents[1]
GPT = REPO / "configs/experiments/gpt-tiny.yaml"
STEPS = 6


def overrides(run_dir, *extra):
    return [f"train.steps={STEPS}", "train.seq_len=32", "train.batch_size=8",
            "train.log_every=1", f"train.run_dir={run_dir}", "train.progress=false",
            "train.eval_steps=1", "train.compilation_cache=", "mesh.data=-1",
            "checkpoint.every=0", "checkpoint.keep=10", "data.synthetic_num_documents=200",
            *extra]


def make_config(run_dir, *extra):
    return config.load(GPT, overrides(run_dir, *extra))


CHILD = textwrap.dedent('''
    import json, logging, os, re, signal, sys, time
    # 8 devices, the session's other XLA flags kept (they are part of the compile cache key)
    flags = re.sub("--xla_force_host_platform_device_count=[0-9]+", "",
                   os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=8"
    spec = json.loads(sys.argv[1])
    from llmjax import compile_cache
    compile_cache.enable(spec["cache"])
    if spec.get("sigterm_in_build"):  # a signal while the model is being built
        import llmjax.train.trainer as trainer
        original = trainer.build
        def build(*args, **kwargs):
            print("BUILDING", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)
        trainer.build = build
    if spec.get("enospc_at"):  # the disk fills up under the checkpoint of that step
        import errno
        import llmjax.checkpoint.data_state as ck
        write = ck._write_json
        def full(path, data):
            if f"/{spec['enospc_at']}.orbax-checkpoint-tmp" in str(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            write(path, data)
        ck._write_json = full
    if spec.get("cli"):  # through `llmjax train` (its logging setup, its error lines)
        from llmjax.cli import main
        sys.argv = ["llmjax", *spec.get("flags", []), "train", spec["config"], *spec["overrides"]]
        sys.exit(main())  # as the `llmjax` program runs it
    logging.basicConfig(level=logging.INFO)
    from llmjax import config
    from llmjax.train.trainer import train
    def on_step(step):
        if step == spec.get("sigint_at"):
            os.kill(os.getpid(), signal.SIGINT)
            if spec.get("twice"):
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGINT)
        if step == spec.get("kill_at"):
            os.kill(os.getpid(), signal.SIGKILL)
    result = train(config.load(spec["config"], spec["overrides"]), on_step=on_step)
    sys.exit(result.exit_code)
''')


def spawn(child_script, cache_dir, run_dir, *extra, **spec):
    spec = {"cache": str(cache_dir), "config": str(GPT), "overrides": overrides(run_dir, *extra),
            **spec}
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(child_script), json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    return proc.returncode, proc.stdout


def rows(run_dir) -> list[dict]:
    """metrics.jsonl rows without their wall-clock fields."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in ("time", "tokens_per_second", "flops_per_second", "mfu"):
            row.pop(key, None)
        out.append(row)
    return out


def tb_scalars(run_dir) -> list[tuple]:
    """Sorted (tag, step, value) of every scalar in run_dir/tensorboard's event files."""
    from tensorboardX.proto import event_pb2
    out = []
    for path in sorted((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: length, crc, payload, crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.tag.split("/")[-1] in ("tokens_per_second", "flops_per_second"):
                    continue
                out.append((value.tag, event.step, value.simple_value))
    return sorted(out)


def digest(directory) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def params_of(state) -> dict:
    return {k: np.asarray(jax.device_get(v))
            for k, v in flatten((state.params, state.opt_state)).items()}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    """STEPS steps without interruption, TensorBoard on, log lines captured."""
    run_dir = tmp_path_factory.mktemp("straight")
    handler = _Lines()
    logger = logging.getLogger("llmjax")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        result = train(make_config(run_dir))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert result.exit_code == 0 and result.checkpoint_step == STEPS
    return result, handler.lines


# ---------------------------------------------------------------- preflight

def test_tokenizer_larger_than_model_vocab_fails_before_build(tmp_path, monkeypatch):
    from llmjax.data.tokenizer import train_sentencepiece
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of some text with words {i * 7}" for i in range(300)))
    train_sentencepiece([text], tmp_path / "tok", vocab_size=600)
    import llmjax.train.trainer as trainer
    monkeypatch.setattr(trainer, "build", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ConfigError, match=r"has 600 tokens.*model.vocab_size=512.*"
                                          r"set model.vocab_size=600"):
        train(make_config(tmp_path / "run", f"data.tokenizer={tmp_path / 'tok'}"))
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*nope.*does not exist"):
        train(make_config(tmp_path / "run", f"data.tokenizer={tmp_path / 'nope'}"))
    # Data files: a glob matching nothing, files that are all empty, a missing data_dir.
    (tmp_path / "empty.txt").write_text("")
    text_source = ["data.source=text", f"data.tokenizer={tmp_path / 'tok'}",
                   "model.vocab_size=600", f"data.data_dir={tmp_path / 'prepared'}"]
    with pytest.raises(ConfigError, match=r"data.paths: .*missing\*.txt.* matches no file"):
        train(make_config(tmp_path / "run", *text_source, f"data.paths=[{tmp_path}/missing*.txt]"))
    with pytest.raises(ConfigError, match=r"data.paths: every file .*empty.txt.* is empty"):
        train(make_config(tmp_path / "run", *text_source, f"data.paths=[{tmp_path}/empty.txt]"))
    with pytest.raises(ConfigError, match=r"data.data_dir=.*absent.* does not exist"):
        train(make_config(tmp_path / "run", "data.source=tfds", "data.name=lm1b",
                          f"data.data_dir={tmp_path / 'absent'}",
                          f"data.tokenizer={tmp_path / 'tok'}", "model.vocab_size=600"))


def test_run_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a real failure (root can write anywhere, but not under a file)
    import llmjax.train.trainer as trainer
    monkeypatch.setattr(trainer, "build", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ConfigError, match=r"train.run_dir=.*file/run.* is not writable: "
                                          r"Not a directory \[ENOTDIR\]"):
        train(make_config(blocker / "run"))


# ---------------------------------------------------------------- non-finite guard

def test_nan_stops_keeps_last_good_checkpoint_and_records_nan(tmp_path, straight, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0].run_dir, run_dir)
    before = digest(run_dir / "checkpoints")
    # lr 1e6 from step 6: saves every step are attempted, none may hold NaN weights.
    cfg = make_config(run_dir, "train.steps=14", "optimizer.learning_rate=1e6",
                      "optimizer.warmup_steps=0", "checkpoint.every=1", "train.log_every=4")
    with pytest.raises(NonFiniteError, match=r"NaN/inf at step \d+.*train.nonfinite=skip"), \
            caplog.at_level(logging.INFO, logger="llmjax"):
        train(cfg)
    # Resuming with changed settings says what changed and what it does to the schedule.
    assert f"train.steps {STEPS} -> 14" in caplog.text
    assert "optimizer.learning_rate 0.003 -> 1000000.0" in caplog.text
    assert f"at step {STEPS} it was" in caplog.text
    after = digest(run_dir / "checkpoints")
    assert {k: v for k, v in after.items() if k.startswith(f"{STEPS}/")} == before
    from llmjax.train.experiment import build
    ckpt = TrainCheckpoints(run_dir, cfg)
    exp = build(cfg)
    for step in ckpt.all_steps():  # every checkpoint written holds finite weights
        state, _, _ = restore_state(ckpt, step, exp)
        assert all(np.isfinite(v).all() for v in params_of(state).values()
                   if np.issubdtype(v.dtype, np.floating)), step
    ckpt.close()
    nan_rows = [r for r in rows(run_dir) if r["split"] == "train" and not np.isfinite(r["loss"])]
    assert nan_rows and nan_rows[-1]["nonfinite_steps"] >= 1


def test_nan_through_the_cli_is_one_line_naming_step_checkpoint_and_fix(tmp_path, straight,
                                                                         capsys):
    from llmjax.cli import main
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0].run_dir, run_dir)
    code = main(["train", str(GPT), *overrides(run_dir, "train.steps=14",
                                               "optimizer.learning_rate=1e6",
                                               "optimizer.warmup_steps=0")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("llmjax: error: loss or gradient norm became NaN/inf "
                                        "at step "), err
    assert re.search(r"at step (\d+)", err).group(1) in map(str, range(STEPS + 1, 15))
    assert f"the last checkpoint (step {STEPS}, {run_dir / 'checkpoints' / str(STEPS)}) holds " \
           f"finite weights" in err
    assert "lower optimizer.learning_rate" in err and "train.nonfinite=skip" in err
    assert "resumes from it" in err


def test_skip_mode_keeps_training_finite_and_time_based_checkpoints(tmp_path, cache_dir):
    # checkpoint.every_minutes is checked at log intervals: a tiny one saves at each of them.
    result = train(make_config(tmp_path, "optimizer.learning_rate=1e6",
                               "optimizer.warmup_steps=0", "train.nonfinite=skip",
                               "checkpoint.every_minutes=1e-9", "train.log_every=2"))
    assert result.exit_code == 0 and result.step == STEPS
    assert TrainCheckpoints(tmp_path, make_config(tmp_path)).all_steps() == [2, 4, 6]
    assert all(np.isfinite(v).all() for v in params_of(result.state).values()
               if np.issubdtype(v.dtype, np.floating))
    skipped = sum(r.get("nonfinite_steps", 0) for r in rows(tmp_path) if r["split"] == "train")
    assert skipped >= 1  # lr 1e6 does diverge: the guard had something to skip


# ---------------------------------------------------------------- signals

def test_ctrl_c_checkpoints_exits_130_and_resumes_bit_exact(tmp_path, straight, cache_dir,
                                                          child_script):
    result, _ = straight
    code, out = spawn(child_script, cache_dir, tmp_path, sigint_at=3)
    assert code == EXIT_INTERRUPTED, out
    assert "Traceback" not in out and "stopped at step 3 by Ctrl-C" in out
    assert TrainCheckpoints(tmp_path, make_config(tmp_path)).all_steps() == [3]
    resumed = train(make_config(tmp_path))
    assert resumed.resumed_from == 3 and resumed.exit_code == 0
    assert rows(tmp_path) == rows(result.run_dir)
    a, b = params_of(resumed.state), params_of(result.state)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_second_ctrl_c_exits_at_once(tmp_path, cache_dir, child_script):
    code, out = spawn(child_script, cache_dir, tmp_path, sigint_at=2, twice=True)
    assert code == EXIT_INTERRUPTED and "second Ctrl-C" in out, out
    assert "Traceback" not in out


def test_sigterm_during_startup_exits_75_with_a_message(tmp_path, cache_dir, child_script):
    code, out = spawn(child_script, cache_dir, tmp_path, sigterm_in_build=True, cli=True)
    assert "BUILDING" in out
    assert code == EXIT_PREEMPTED, out
    assert "SIGTERM during start-up" in out and "Traceback" not in out
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# ---------------------------------------------------------------- metrics files

def test_kill9_before_first_checkpoint_then_restart_matches_straight_run(
        tmp_path, straight, cache_dir, child_script):
    result, _ = straight
    code, out = spawn(child_script, cache_dir, tmp_path, kill_at=4)
    assert code == -signal.SIGKILL, out
    assert len([r for r in rows(tmp_path) if r["split"] == "train"]) == 4
    train(make_config(tmp_path))
    assert rows(tmp_path) == rows(result.run_dir)
    assert tb_scalars(tmp_path) == tb_scalars(result.run_dir)


def test_disk_full_during_save_is_one_line_and_resume_is_clean(tmp_path, straight, monkeypatch):
    """Simulates ENOSPC by making the checkpoint's data-item writer raise it (what a full
    disk raises from write()); orbax's own commit path is exercised as in a real failure."""
    import llmjax.checkpoint.data_state as ck
    original = ck._write_json

    def full(path, data):
        if "/4.orbax-checkpoint-tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(path, data)

    monkeypatch.setattr(ck, "_write_json", full)
    with pytest.raises(CheckpointError) as info:
        train(make_config(tmp_path, "checkpoint.every=2"))  # surfaces at the next save
    message = str(info.value)
    assert "\n" not in message and "No space left on device [ENOSPC]" in message
    assert "4.orbax-checkpoint-tmp" in message and "earlier checkpoints [2] are intact" in message
    kept = digest(tmp_path / "checkpoints" / "2")
    monkeypatch.setattr(ck, "_write_json", original)
    resumed = train(make_config(tmp_path, "checkpoint.every=2"))
    assert resumed.resumed_from == 2
    steps = [r["step"] for r in rows(tmp_path) if r["split"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # no step twice
    assert rows(tmp_path) == rows(straight[0].run_dir)
    assert kept and digest(tmp_path / "checkpoints" / "2") == kept  # read, never rewritten


def test_disk_full_through_the_cli_shows_our_lines_not_orbax_tracebacks(tmp_path, cache_dir,
                                                                         child_script):
    """orbax logs a failed background save as ERROR tracebacks through absl; the terminal
    gets llmjax's lines only, the error as one line with exit code 2; --debug shows orbax's."""
    extra = ("checkpoint.every=2", f"train.compilation_cache={cache_dir}")
    code, out = spawn(child_script, cache_dir, tmp_path / "quiet", *extra, enospc_at=4, cli=True)
    assert code == 2, out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("llmjax: error: cannot write a checkpoint in ") and \
        "No space left on device [ENOSPC]" in lines[-1]
    # llmjax's log lines (the child imports orbax first, whose handler sets the format)
    assert all(re.match(r"(INFO|WARNING)[ :]llmjax", line) for line in lines[:-1]), out
    code, out = spawn(child_script, cache_dir, tmp_path / "verbose", *extra, enospc_at=4,
                      cli=True, flags=["--debug"])
    assert "Traceback" in out and "ERROR" in out and "absl" in out, out


# ---------------------------------------------------------------- reporting, schedule

def test_log_lines_compile_report_and_summary(straight):
    _, lines = straight
    text = "\n".join(lines)
    assert "compiling the train step" in text and "train step compiled in" in text
    interval = [line for line in lines if line.startswith(f"step {STEPS}/{STEPS}, loss")]
    assert interval and "tokens/s" in interval[0] and "elapsed" in interval[0]
    assert "final evaluation" in text
    summary = next(line for line in lines if line.startswith("run complete"))
    assert f"{STEPS} steps" in summary and "eval loss: final" in summary
    assert f"checkpoints/{STEPS}" in summary and "llmjax export" in summary
    curves = straight[0].run_dir / "curves.png"  # train.plot (default on)
    assert f"curves: {curves}" in summary
    assert curves.read_bytes().startswith(b"\x89PNG")


def test_a_plotting_failure_does_not_fail_a_finished_run(tmp_path, straight, monkeypatch,
                                                         caplog):
    import llmjax.plot
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0].run_dir, run_dir)
    (run_dir / "curves.png").unlink()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "curves.png"))

    monkeypatch.setattr(llmjax.plot, "plot_runs", full)
    with caplog.at_level(logging.INFO, logger="llmjax"):
        result = train(make_config(run_dir, f"train.steps={STEPS + 1}"))
    assert result.exit_code == 0 and result.checkpoint_step == STEPS + 1
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warning == (f"could not write the training curves (train.plot=false turns them "
                       f"off): {run_dir / 'curves.png'}: No space left on device")
    assert "curves:" not in caplog.text and not (run_dir / "curves.png").exists()


def test_finished_run_does_nothing(straight, caplog):
    result, _ = straight
    run_dir = result.run_dir
    before = digest(run_dir)
    with caplog.at_level(logging.INFO, logger="llmjax"):
        again = train(make_config(run_dir))
    assert again.exit_code == 0 and again.checkpoint_step == STEPS
    assert again.eval_metrics["loss"] == pytest.approx(result.eval_metrics["loss"])
    assert "is complete" in caplog.text
    assert digest(run_dir) == before  # nothing retrained, nothing rewritten


def test_init_from_architecture_differences(tmp_path, straight):
    source = straight[0].run_dir
    common = [f"train.init_from={source}", "train.steps=1"]
    with pytest.raises(CheckpointError, match=r"model.activation 'gelu' -> 'relu'.*"
                                              r"train.init_override=\[activation\]"):
        train(make_config(tmp_path / "a", *common, "model.activation=relu"))
    with pytest.raises(CheckpointError, match=r"model.norm_eps 1e-05 -> 1e-06"):
        train(make_config(tmp_path / "b", *common, "model.norm_eps=1e-6"))
    result = train(make_config(tmp_path / "c", *common, "model.activation=relu",
                               "train.init_override=[activation]", "model.remat=full",
                               "model.max_len=64"))
    report = result.init_report
    assert report.overridden[0] == "model.activation 'gelu' -> 'relu'"
    assert any(o.startswith("model.max_len") and "cut" in o for o in report.overridden)
    assert report.runtime == ["model.remat 'none' -> 'full'"]
