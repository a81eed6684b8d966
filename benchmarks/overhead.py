"""Host overhead: a trainer-like loop vs the compiled train step alone.

    python benchmarks/overhead.py [--steps 30] [--log-every 10] [--models tiny reference]

"compiled step alone": the jitted step dispatched back to back on one device-resident batch,
one block at the end (pure device time per step). "trainer loop": what llmjax's trainer does
per step: next batch from the real data pipeline (llmjax.data make_iterator, packing, on a
background thread via prefetch_to_device, 2 ahead, placed with the batch sharding), async
dispatch, metrics pulled to the host only every --log-every steps. The two alternate
(3 rounds) and the medians are compared. Goal (issue 8): loop within 5% of the step alone.
"""
from __future__ import annotations

import argparse
import time

from common import jax, median, reference_config, table


def make(model: str):
    from llmjax.train.experiment import build
    if model == "reference":
        cfg = reference_config()
    else:  # gpt-tiny at seq 128: a ~10 ms step, where overhead shows most
        from llmjax.config import from_dict
        cfg = from_dict({"model": "gpt-tiny", "objective": {"name": "clm"},
                         "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
                         "train": {"batch_size": 8, "seq_len": 128}})
    exp = build(cfg, devices=jax.devices()[:1])
    return cfg, exp


def alone(exp, state, step, batch, n):
    t = time.perf_counter()
    for _ in range(n):
        state, m = step(state, batch)
    float(m["loss"])
    return state, (time.perf_counter() - t) / n


def loop(cfg, exp, state, step, n, log_every):
    from llmjax.data.device import prefetch_to_device
    from llmjax.data.pipeline import make_iterator
    it = make_iterator(cfg.data, exp.objective.batch_kind, cfg.train.seq_len,
                       cfg.train.batch_size, vocab_size=cfg.model.vocab_size)
    sharding = list(exp.batch_shardings(["tokens"]).values())[0]
    batches = prefetch_to_device(it, sharding, size=2)
    first = next(batches)
    state, m = step(state, first)  # make sure the batch keys' program is compiled
    float(m["loss"])
    t = time.perf_counter()
    logged = []
    for i in range(1, n + 1):
        state, m = step(state, next(batches))
        if i % log_every == 0:
            logged.append({k: float(v) for k, v in jax.device_get(m).items()})
    float(m["loss"])
    dt = (time.perf_counter() - t) / n
    if hasattr(batches, "close"):
        batches.close()
    return state, dt, list(first.keys())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=["tiny", "reference"])
    args = ap.parse_args()
    rows = []
    for model in args.models:
        cfg, exp = make(model)
        n = args.steps if model == "tiny" else max(args.steps // 5, 4)
        state = exp.init_state()
        step, keys = _step_for(exp, cfg)
        batch = _device_batch(cfg, exp, keys)
        state, _ = alone(exp, state, step, batch, 1)  # compile outside the timings
        t_alone, t_loop = [], []
        for r in range(args.rounds):
            state, dt, _ = loop(cfg, exp, state, step, n, args.log_every)
            t_loop.append(dt)
            state, dt = alone(exp, state, step, batch, n)
            t_alone.append(dt)
            print(f"{model} round {r + 1}: loop {t_loop[-1] * 1e3:.1f} ms/step, "
                  f"alone {t_alone[-1] * 1e3:.1f} ms/step", flush=True)
        a, b = median(t_alone), median(t_loop)
        rows.append([model, n, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{(b / a - 1) * 100:+.1f}%"])
    print()
    print(table(["model", "steps/round", "step alone ms", "trainer loop ms", "overhead"], rows))


def _step_for(exp, cfg):
    from llmjax.data.pipeline import make_iterator
    keys = list(next(make_iterator(cfg.data, exp.objective.batch_kind, cfg.train.seq_len,
                                   cfg.train.batch_size, vocab_size=cfg.model.vocab_size)).keys())
    return exp.train_step(keys), keys


def _device_batch(cfg, exp, keys):
    from llmjax.data.device import to_global
    from llmjax.data.pipeline import make_iterator
    it = make_iterator(cfg.data, exp.objective.batch_kind, cfg.train.seq_len,
                       cfg.train.batch_size, vocab_size=cfg.model.vocab_size)
    return to_global(next(it), list(exp.batch_shardings(keys).values())[0])


if __name__ == "__main__":
    main()
