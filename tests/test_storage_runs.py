"""Whole training runs that live on object storage (train.run_dir=gs://..., the `gcs_bucket`
fixture's fake-gcs-server on 127.0.0.1): kill -9 mid-run and relaunch, one process x 8 devices
<-> two processes x 4 devices on the same run, a torn checkpoint moved aside on the bucket,
export / save_params / adapters to gs:// and init_from them. No local path named `gs:` may
appear anywhere (pathlib turns gs://b/x into the local directory gs:/b/x).

Tiny GPT, 6 steps of batch 8 x 32 tokens, checkpoints every 2 steps; the subprocesses share
the session's compilation cache (conftest's JAX_COMPILATION_CACHE_DIR)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import config, metrics_files, paths
from llmjax.tree import flatten

REPO = Path(__file__).resolve().parents[1]
GPT = REPO / "configs/experiments/gpt-tiny.yaml"
STEPS = 6
KILL_AT = 5  # after checkpoint 4 committed (checkpoint.every=2)


def overrides(run_dir, *extra):
    return [f"train.steps={STEPS}", "train.seq_len=32", "train.batch_size=8", "train.log_every=1",
            f"train.run_dir={run_dir}", "train.progress=false", "train.eval_steps=1",
            "train.compilation_cache=", "mesh.data=-1", "checkpoint.every=2",
            "checkpoint.keep=10", "data.synthetic_num_documents=200", "train.plot=false", *extra]


# One training process: jax.distributed from the spec (not from environment variable names),
# kill -9 of itself once checkpoint `commit` has committed on the bucket.
CHILD = textwrap.dedent('''
    import json, logging, os, re, signal, sys, time
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("llmjax").setLevel(logging.INFO)
    spec = json.loads(sys.argv[1])
    # the session's other XLA flags kept (they are part of the compile cache key)
    flags = re.sub("--xla_force_host_platform_device_count=[0-9]+", "",
                   os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={spec['devices']}"
    import jax
    if spec.get("processes", 1) > 1:
        jax.distributed.initialize(spec["coordinator"], spec["processes"], spec["process_id"])
    from llmjax import config, paths
    from llmjax.train.trainer import train

    def on_step(step):
        if step == spec.get("kill_at"):
            marker = paths.resolve(spec["commit"])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                paths.forget_listings(marker.parent)
                if marker.exists():
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.05)
            sys.exit("checkpoint never committed: " + spec["commit"])
    result = train(config.load(spec["config"], spec["overrides"]), on_step=on_step)
    sys.exit(result.exit_code)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, cwd: Path, run_dir: str, processes: int = 1, **spec) -> list:
    """Run the child on `processes` processes (8 devices in all); [(returncode, output)]."""
    devices = 8 // processes
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMJAX_COORD")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, str(script), json.dumps({
            "config": str(GPT), "overrides": overrides(run_dir), "devices": devices,
            "processes": processes, "process_id": i, "coordinator": f"127.0.0.1:{port}",
            "commit": f"{run_dir}/checkpoints/{KILL_AT - 1}/commit_success.txt", **spec})],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(processes)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def losses(run_dir: str) -> list[tuple]:
    """(split, step, loss) of every metrics row of a run, read from the bucket."""
    return [(r["split"], r["step"], r["loss"]) for r in metrics_files.read_rows(run_dir)]


def params_of(state) -> dict:
    return {k: np.asarray(jax.device_get(v)) for k, v in flatten(state.params).items()}


def assert_same_params(got: dict, want: dict, **tolerance) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if tolerance and key.endswith(NOISE_ONLY):
            np.testing.assert_allclose(got[key], want[key], err_msg=key, atol=NOISE_ATOL)
        elif tolerance:
            np.testing.assert_allclose(got[key], want[key], err_msg=key, **tolerance)
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def copy_prefix(source: str, target: str) -> None:
    fs = paths.filesystem("gs")
    names = fs.find(source)
    root = source.split("://", 1)[1]
    fs.copy(names, [target + n[len(root):] for n in names])


def gs_colon_paths(*roots) -> list[str]:
    """Local paths whose name starts with `gs:` under `roots` (depth-limited walks)."""
    found = []
    for root, depth in roots:
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            continue
        base = root.rstrip(os.sep).count(os.sep)
        for here, dirs, files in os.walk(root):
            found += [os.path.join(here, n) for n in dirs + files if n.startswith("gs:")]
            if here.count(os.sep) - base >= depth:
                dirs[:] = []
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The cwd of every run here (in-process ones chdir to it as well)."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def child_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("child") / "child.py"
    path.write_text(CHILD)
    return path


@pytest.fixture(scope="module")
def prefix(gcs_bucket):
    return f"{gcs_bucket}/runs-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def straight(prefix, workdir):
    """STEPS steps into the bucket without interruption, one process x 8 devices."""
    from llmjax.train.trainer import train

    old = os.getcwd()
    os.chdir(workdir)
    try:
        result = train(config.load(GPT, overrides(f"{prefix}/straight")))
    finally:
        os.chdir(old)
    assert result.exit_code == 0 and result.checkpoint_step == STEPS
    return result, losses(f"{prefix}/straight"), params_of(result.state)


@pytest.fixture(scope="module")
def killed_single(prefix, workdir, child_script, straight):
    """One process x 8 devices, kill -9 at step 5 (checkpoint 4 committed); copied to a second
    run for the two-process relaunch."""
    run = f"{prefix}/killed"
    [(code, out)] = launch(child_script, workdir, run, kill_at=KILL_AT)
    assert code == -9, out[-3000:]
    copy_prefix(run, f"{prefix}/killed-copy")
    return run, f"{prefix}/killed-copy"


def resume_here(run_dir: str, workdir: Path):
    from llmjax.train.trainer import train

    old = os.getcwd()
    os.chdir(workdir)
    try:
        return train(config.load(GPT, overrides(run_dir)))
    finally:
        os.chdir(old)


def test_kill9_on_gcs_then_relaunch_is_bit_identical(killed_single, straight, workdir):
    run, _ = killed_single
    _, straight_losses, straight_params = straight
    steps = sorted(int(p.name) for p in paths.resolve(f"{run}/checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps[-1] == KILL_AT - 1  # the killed run got as far as checkpoint 4
    result = resume_here(run, workdir)
    assert result.exit_code == 0 and result.resumed_from == KILL_AT - 1
    assert losses(run) == straight_losses
    assert_same_params(params_of(result.state), straight_params)
    # pathlib would have made `gs:/...` directories: none in the runs' cwd, tmp, or the caches
    found = gs_colon_paths((workdir, 8), (tempfile.gettempdir(), 1), ("~/.cache", 4),
                           (paths.cache_root(), 8), (os.getcwd(), 1), ("/", 1))
    assert not found, found


# Two processes x 4 devices and one x 8 run the same program on the same global batches, but
# the gradient all-reduce across two processes (gloo, CPU collectives) adds the devices'
# partial sums in another order than the reduction within one process: float addition is not
# associative, so the parameters differ in the last bits (measured after two steps: at most
# 2.3e-10 absolute, 3.1e-6 relative) and so do the logged losses (1.5e-7 relative). Runs that
# change the process count are compared at these tolerances; same-count resumes bit-exactly.
# The attention key bias has an exactly zero gradient (softmax ignores a shift shared by all
# keys): it holds rounding noise, which AdamW scales up to ~lr * noise / eps per step
# (measured: 7.5e-7 apart), so it is compared in absolute terms only.
LOSS_RTOL = 1e-6
PARAM_TOL = {"rtol": 1e-5, "atol": 1e-8}
NOISE_ONLY = ("attention/key/bias",)
NOISE_ATOL = 1e-5


def test_two_processes_kill9_then_one_process_resumes(prefix, workdir, child_script, straight):
    _, straight_losses, straight_params = straight
    run = f"{prefix}/two-then-one"
    results = launch(child_script, workdir, run, processes=2, kill_at=KILL_AT)
    for code, out in results:
        assert code == -9, out[-3000:]
    assert paths.resolve(f"{run}/checkpoints/{KILL_AT - 1}/data/process_1.json").exists()
    result = resume_here(run, workdir)
    assert result.exit_code == 0 and result.resumed_from == KILL_AT - 1
    got = losses(run)
    assert [r[:2] for r in got] == [r[:2] for r in straight_losses]
    np.testing.assert_allclose([r[2] for r in got], [r[2] for r in straight_losses],
                               rtol=LOSS_RTOL)
    assert_same_params(params_of(result.state), straight_params, **PARAM_TOL)


def test_one_process_kill9_then_two_processes_resume(killed_single, straight, workdir,
                                                     child_script):
    from llmjax.loader import load_model

    _, run = killed_single
    _, straight_losses, straight_params = straight
    for code, out in launch(child_script, workdir, run, processes=2):
        assert code == 0, out[-3000:]
        assert f"resumed from {run}/checkpoints/{KILL_AT - 1}" in out, out[-3000:]
    got = losses(run)
    assert [r[:2] for r in got] == [r[:2] for r in straight_losses]
    np.testing.assert_allclose([r[2] for r in got], [r[2] for r in straight_losses],
                               rtol=LOSS_RTOL)
    final = load_model(run)
    assert final.source.name == str(STEPS)
    assert_same_params({k: np.asarray(v) for k, v in flatten(final.params).items()},
                       straight_params, **PARAM_TOL)


def test_a_torn_checkpoint_on_gcs_is_moved_aside_and_the_run_resumes(prefix, straight, workdir,
                                                                     caplog):
    """The newest checkpoint lost an object (a save cut off on object storage): the relaunch
    warns, copies it to checkpoints.incomplete/ and deletes it (no rename on GCS), resumes
    from the one before and ends where the straight run did."""
    _, straight_losses, straight_params = straight
    run = f"{prefix}/torn"
    copy_prefix(f"{prefix}/straight", run)
    paths.resolve(f"{run}/checkpoints/{STEPS}/state/manifest.ocdbt").unlink()
    with caplog.at_level("WARNING", logger="llmjax"):
        result = resume_here(run, workdir)
    assert result.exit_code == 0 and result.resumed_from == STEPS - 2
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"checkpoint {STEPS}: {run}/checkpoints/{STEPS}/state/manifest.ocdbt is missing" \
        in warning, warning
    [aside] = paths.resolve(f"{run}/checkpoints.incomplete").iterdir()
    assert aside.name.startswith(f"{STEPS}-") and (aside / "state" / "_METADATA").exists()
    assert not (aside / "state" / "manifest.ocdbt").exists()
    assert (paths.resolve(f"{run}/checkpoints/{STEPS}/state/manifest.ocdbt")).exists()
    assert losses(run) == straight_losses
    assert_same_params(params_of(result.state), straight_params)


def test_exports_save_params_and_adapters_on_gcs_and_init_from_them(prefix, straight, capsys):
    from llmjax import cli, peft
    from llmjax.checkpoint import load_params, save_params
    from llmjax.config import ConfigError
    from llmjax.train.experiment import build
    from llmjax.train.init_from import init_from

    result, _, straight_params = straight
    run, out = f"{prefix}/straight", f"{prefix}/export"
    assert cli.main(["export", run, out]) == 0
    assert cli.main(["export", run, out]) == 2  # exists: --force needed, said in one line
    assert "--force" in capsys.readouterr().err
    assert cli.main(["export", run, out, "--force"]) == 0
    assert not [p for p in paths.resolve(prefix).iterdir() if p.name.startswith(".export")]

    cfg = config.load(GPT, overrides(f"{prefix}/unused"))
    exp = build(cfg)
    for source in (run, out):  # a gs:// run (its latest checkpoint) and a gs:// export
        state, report = init_from(exp, source)
        assert not report.new and not report.dropped
        assert_same_params(params_of(state), straight_params)

    saved = f"{prefix}/params"
    save_params(saved, result.state.params, cfg)
    with pytest.raises(ConfigError, match="already holds"):
        save_params(saved, result.state.params, cfg)
    save_params(saved, result.state.params, cfg, force=True)
    params, stored = load_params(saved)
    assert stored["model"] == cfg.to_dict()["model"]
    assert_same_params({k: np.asarray(v) for k, v in flatten(params).items()}, straight_params)
    with pytest.raises(ConfigError, match="training run directory"):
        save_params(run, result.state.params, cfg, force=True)  # never into a run

    adapter = f"{prefix}/adapter"
    head = {"lm_head": result.state.params.get("lm_head", next(iter(result.state.params.values())))}
    peft.save_adapter(adapter, head, peft.PeftConfig(method="lora"), base=out)
    tree, peft_cfg, stored = peft.load_adapter(adapter)
    assert peft_cfg.method == "lora" and stored["base"] == out
    assert flatten(tree).keys() == flatten(head).keys()
