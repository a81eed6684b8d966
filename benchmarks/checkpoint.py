"""Checkpoint save/restore time and size for the reference GPT (6L, d384, 6H, V 8192, max_len 256)
with its AdamW state, on local disk and on a GCS server (fake-gcs-server on 127.0.0.1,
tests/gcs_server.py: the same HTTP API and client code paths as real GCS, without its latency).

    python benchmarks/checkpoint.py [--devices 8] [--repeats 3] [--storage local gcs]

Reports per storage: blocking part of an async save (until training may continue), total save
time (until committed), restore time onto the same mesh and onto one device, and the objects
one checkpoint step is made of (count, total, sizes): on real GCS each object costs a request
(tens of milliseconds of latency), so many tiny objects, not bytes, set the time
(docs/storage.md).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPT = REPO / "configs/experiments/gpt-tiny.yaml"
OVERRIDES = ["model.num_layers=6", "model.d_model=384", "model.num_heads=6", "model.d_ff=1536",
             "model.vocab_size=8192", "model.max_len=256", "train.seq_len=256",
             "train.compilation_cache=", "checkpoint.keep=2"]


def objects(step_dir: str) -> list[tuple[str, int]]:
    """(name relative to the step, size) of every file/object of a checkpoint step."""
    from llmjax import paths

    if paths.is_remote(step_dir):
        found = paths.filesystem(paths.scheme(step_dir)).find(step_dir, detail=True)
        root = step_dir.split("://", 1)[1].rstrip("/") + "/"
        return sorted((name[len(root):], int(info.get("size") or 0))
                      for name, info in found.items() if info.get("type") == "file")
    return sorted((str(p.relative_to(step_dir)), p.stat().st_size)
                  for p in Path(step_dir).rglob("*") if p.is_file())


def describe(files: list[tuple[str, int]]) -> str:
    sizes = sorted(size for _, size in files)
    small = sum(1 for s in sizes if s < 64 * 1024)
    biggest = max(files, key=lambda f: f[1])
    return (f"{len(files)} objects, {sum(sizes) / 2**20:.1f} MiB; {small} under 64 KiB "
            f"(median {statistics.median(sizes) / 1024:.1f} KiB); largest {biggest[1] / 2**20:.1f} "
            f"MiB ({biggest[0]})")


def with_moments(state):
    """A fresh state's AdamW moments are zeros, which tensorstore compresses to almost
    nothing: fill them (and any float optimizer leaf) with noise, as after training."""
    import jax

    keys = iter(jax.random.split(jax.random.key(0), 10_000))

    def noise(x):
        if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            return x
        return jax.jit(lambda k: jax.random.normal(k, x.shape, x.dtype) * 1e-3,
                       out_shardings=x.sharding)(next(keys))
    return state.replace(opt_state=jax.tree.map(noise, state.opt_state))


def bench(run_dir: str, repeats: int) -> dict:
    import jax

    from llmjax import config
    from llmjax.checkpoint import TrainCheckpoints
    from llmjax.models import param_count
    from llmjax.train.experiment import build
    from llmjax.train.resume import restore_state

    cfg = config.load(GPT, OVERRIDES + [f"train.run_dir={run_dir}"])
    exp = build(cfg)
    state = with_moments(exp.init_state())
    ckpt = TrainCheckpoints(run_dir, cfg)
    blocking, total = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        ckpt.save(i + 1, state, {"dummy": i}, exp.mesh)
        t_block = time.perf_counter() - start
        ckpt.wait()
        t_total = time.perf_counter() - start
        if i:  # the first save pays one-off setup
            blocking.append(t_block)
            total.append(t_total)
    step = ckpt.latest_step()
    files = objects(str(ckpt.step_dir(step)))
    one = build(config.load(GPT, OVERRIDES + [f"train.run_dir={run_dir}", "mesh.data=1"]),
                jax.devices()[:1])
    restore_same, restore_one = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(restore_state(ckpt, step, exp)[0])
        t = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(restore_state(ckpt, step, one)[0])
        if i:
            restore_same.append(t)
            restore_one.append(time.perf_counter() - start)
    ckpt.close()
    med = statistics.median
    return {"params": param_count(state.params), "mesh": dict(exp.mesh.shape), "files": files,
            "blocking": med(blocking), "total": med(total), "restore_same": med(restore_same),
            "restore_one": med(restore_one)}


@contextlib.contextmanager
def storage_root(kind: str):
    if kind == "local":
        root = tempfile.mkdtemp(prefix="llmjax-ckpt-bench-")
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    sys.path.insert(0, str(REPO / "tests"))
    from gcs_server import running  # fake-gcs-server from the `test` extra

    with running(("llmjax-bench",)):
        yield f"gs://llmjax-bench/{uuid.uuid4().hex[:8]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--storage", nargs="+", choices=("local", "gcs"), default=["local", "gcs"],
                        help="where to write: local disk, the GCS emulator (needs llmjax[test])")
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    for kind in args.storage:
        with storage_root(kind) as root:
            r = bench(root, args.repeats)
        print(f"[{kind}] reference GPT: {r['params']:,} params (+ AdamW moments), mesh {r['mesh']}")
        print(f"[{kind}] one checkpoint: {describe(r['files'])}")
        print(f"[{kind}] save: blocking {r['blocking']:.2f} s, until committed {r['total']:.2f} s")
        print(f"[{kind}] restore: same mesh {r['restore_same']:.2f} s, one device "
              f"{r['restore_one']:.2f} s")
    print(f"(median of {args.repeats}; {jax.device_count()} {jax.devices()[0].platform} devices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
